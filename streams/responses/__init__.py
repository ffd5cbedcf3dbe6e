"""Pure rules of Responses and multi-step chains (responses-and-api §1–§3, §7.8).

Nothing here performs I/O or reads the clock: agents, executors and the HTTP layer pass in what
they loaded (bodies, chains, HTTP results, `now`) and publish what these functions return.
"""
