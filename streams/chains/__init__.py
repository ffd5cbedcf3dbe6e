"""Multi-step responses on Kafka: the chain agent's rules (:mod:`.core`), its table values
(:mod:`.state`), the step executor's rules (:mod:`.runner`) and what it reads back of the
chain log (:mod:`.ledger`). The Faust wiring is in ``streams/agents/chains.py`` and
``streams/agents/steps.py``."""
