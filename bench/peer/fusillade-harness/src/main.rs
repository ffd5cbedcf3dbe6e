//! Drives the reference `fusillade` (crates.io, =19.0.0) through its public API, for
//! `python -m bench.peer`: one file of N chat-completion lines, one 24h batch, fusillade's own
//! daemon and PostgreSQL storage, the batch polled like `bench.baseline` polls Cannonade's API.
//!
//! The caller measures CPU and memory around the run, so the harness talks to it over
//! stdin/stdout, one JSON object per stdout line:
//!
//! 1. connects, runs fusillade's migrations, starts the daemon, prints `{"event":"ready"}` and
//!    waits for a line on stdin (the caller takes its "before" samples);
//! 2. creates the file, the batch (record first, population in the background, as a batch API
//!    does), polls it every 50 ms until populated, then every 250 ms until `completed_at` is set,
//!    prints `{"event":"completed",...}` and waits for a line on stdin ("after" samples);
//! 3. stops the daemon, reads the figures from the request rows, prints `{"event":"result",...}`.
//!
//! Logs (fusillade's tracing) go to stderr.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fusillade::{
    BatchInput, DaemonConfig, DaemonExecutor, FileMetadata, FileStreamItem, FileStreamResult,
    PostgresRequestManager, RequestTemplateInput, Storage,
};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::Row;
use tokio::io::{AsyncBufReadExt, BufReader};

const START_POLL: Duration = Duration::from_millis(50); // bench.baseline: until in_progress
const RUN_POLL: Duration = Duration::from_millis(250); // ... then until completed
const USER: &str = "bench-user";

struct Args {
    database_url: String,
    input: String,
    upstream: String,
    api_key: String,
    concurrency: usize,
    claim_interval_ms: u64,
    claim_batch_size: usize,
    pool_size: u32,
    completion_window: String,
    timeout_s: u64,
    log_level: tracing_subscriber::filter::LevelFilter,
}

const USAGE: &str = "usage: fusillade-harness --database-url URL --input FILE.jsonl \
--upstream BASE_URL [--api-key KEY] [--concurrency 64] [--claim-interval-ms 1000] \
[--claim-batch-size 100] [--pool-size 10] [--completion-window 24h] [--timeout-s 1800] \
[--log-level warn]";

fn parse_args() -> Result<Args, String> {
    let mut values: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag}\n{USAGE}"))?;
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        values.insert(name.to_string(), value);
    }
    let mut take = |name: &str, default: Option<&str>| -> Result<String, String> {
        values
            .remove(name)
            .or_else(|| default.map(str::to_string))
            .ok_or_else(|| format!("--{name} is required\n{USAGE}"))
    };
    fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
        v.parse().map_err(|_| format!("--{name}: not a number: {v}"))
    }
    let args = Args {
        database_url: take("database-url", None)?,
        input: take("input", None)?,
        upstream: take("upstream", None)?,
        api_key: take("api-key", Some("local-upstream-key"))?,
        concurrency: num("concurrency", take("concurrency", Some("64"))?)?,
        claim_interval_ms: num("claim-interval-ms", take("claim-interval-ms", Some("1000"))?)?,
        claim_batch_size: num("claim-batch-size", take("claim-batch-size", Some("100"))?)?,
        pool_size: num("pool-size", take("pool-size", Some("10"))?)?,
        completion_window: take("completion-window", Some("24h"))?,
        timeout_s: num("timeout-s", take("timeout-s", Some("1800"))?)?,
        log_level: take("log-level", Some("warn"))?
            .parse()
            .map_err(|_| "--log-level: error|warn|info|debug|trace|off".to_string())?,
    };
    if let Some(unknown) = values.keys().next() {
        return Err(format!("unknown option --{unknown}\n{USAGE}"));
    }
    Ok(args)
}

fn emit(value: Value) {
    // One line per event: the caller reads stdout line by line.
    println!("{value}");
}

async fn wait_for_go(stdin: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>) -> Result<(), String> {
    match stdin.next_line().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("stdin closed: the caller went away".into()),
        Err(e) => Err(format!("reading stdin: {e}")),
    }
}

/// The JSONL lines as fusillade templates: the body is the line's `body`, sent verbatim to
/// `upstream` + `url`; the model is `body.model`.
fn read_templates(args: &Args) -> Result<(Vec<RequestTemplateInput>, i64), String> {
    let text = std::fs::read_to_string(&args.input).map_err(|e| format!("{}: {e}", args.input))?;
    let mut templates = Vec::new();
    for (n, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let row: Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let body = &row["body"];
        templates.push(RequestTemplateInput {
            custom_id: row["custom_id"].as_str().map(str::to_string),
            endpoint: args.upstream.clone(),
            method: row["method"].as_str().unwrap_or("POST").to_string(),
            path: row["url"].as_str().unwrap_or("/v1/chat/completions").to_string(),
            body: body.to_string(),
            model: body["model"].as_str().unwrap_or_default().to_string(),
            api_key: args.api_key.clone(),
        });
    }
    Ok((templates, text.len() as i64))
}

// Per-row figures from fusillade's own request rows (its timestamps: claimed_at is the claim
// query's time, completed_at the daemon's when it stored the response).
const ROW_STATS: &str = r#"
WITH r AS (
    SELECT state,
           extract(epoch FROM completed_at - claimed_at)::float8 * 1000 AS run_ms,
           extract(epoch FROM started_at - claimed_at)::float8 * 1000 AS queue_ms,
           extract(epoch FROM completed_at - started_at)::float8 * 1000 AS call_ms,
           claimed_at, completed_at
    FROM requests WHERE batch_id = $1
)
SELECT count(*) FILTER (WHERE r.state = 'completed') AS completed,
       count(*) FILTER (WHERE r.state = 'failed') AS failed,
       count(*) AS total,
       percentile_cont(ARRAY[0.5, 0.99]::float8[]) WITHIN GROUP (ORDER BY r.run_ms)
           FILTER (WHERE r.state = 'completed') AS run,
       percentile_cont(ARRAY[0.5, 0.99]::float8[]) WITHIN GROUP (ORDER BY r.queue_ms)
           FILTER (WHERE r.state = 'completed') AS queue,
       percentile_cont(ARRAY[0.5, 0.99]::float8[]) WITHIN GROUP (ORDER BY r.call_ms)
           FILTER (WHERE r.state = 'completed') AS call,
       max(r.run_ms) FILTER (WHERE r.state = 'completed') AS run_max,
       extract(epoch FROM min(r.claimed_at) - b.created_at)::float8 AS first_claim,
       extract(epoch FROM max(r.claimed_at) - b.created_at)::float8 AS last_claim,
       extract(epoch FROM max(r.completed_at) - b.created_at)::float8 AS last_complete,
       extract(epoch FROM b.requests_started_at - b.created_at)::float8 AS populated,
       extract(epoch FROM b.completed_at - b.created_at)::float8 AS batch_completed
FROM r, batches b WHERE b.id = $1
GROUP BY b.created_at, b.requests_started_at, b.completed_at
"#;

fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

fn pct(row: &sqlx::postgres::PgRow, name: &str) -> (Option<f64>, Option<f64>) {
    match row.try_get::<Option<Vec<f64>>, _>(name) {
        Ok(Some(v)) if v.len() == 2 => (Some(round(v[0], 1)), Some(round(v[1], 1))),
        _ => (None, None),
    }
}

fn opt(row: &sqlx::postgres::PgRow, name: &str, digits: i32) -> Option<f64> {
    row.try_get::<Option<f64>, _>(name).ok().flatten().map(|v| round(v, digits))
}

async fn run(args: Args) -> Result<(), String> {
    let pool = PgPoolOptions::new()
        .max_connections(args.pool_size)
        .connect(&args.database_url)
        .await
        .map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
    fusillade::migrator()
        .run(&pool)
        .await
        .map_err(|e| format!("fusillade migrations: {e}"))?;

    // fusillade's defaults except the knobs under test. The model's limit is also the set of
    // models the daemon claims for.
    let config = DaemonConfig {
        claim_interval_ms: args.claim_interval_ms,
        claim_batch_size: args.claim_batch_size,
        ..Default::default()
    };
    let (templates, size_bytes) = read_templates(&args)?;
    let n = templates.len() as i64;
    let models: Vec<String> = {
        let mut m: Vec<String> = templates.iter().map(|t| t.model.clone()).collect();
        m.sort();
        m.dedup();
        m
    };
    for model in &models {
        config.model_concurrency_limits.insert(model.clone(), args.concurrency);
    }
    let knobs = json!({
        "crate": "fusillade 19.0.0",
        "claim_interval_ms": config.claim_interval_ms,
        "claim_batch_size": config.claim_batch_size,
        "pool_max_connections": args.pool_size,
        "model_concurrency_limits": models.iter().map(|m| (m.clone(), json!(args.concurrency))).collect::<serde_json::Map<_, _>>(),
        "max_retries": config.max_retries,
        "heartbeat_interval_ms": config.heartbeat_interval_ms,
        "cancellation_poll_interval_ms": config.cancellation_poll_interval_ms,
        "status_log_interval_ms": config.status_log_interval_ms,
        "urgency_weight": config.urgency_weight,
        "completion_window": args.completion_window,
    });
    let manager = Arc::new(PostgresRequestManager::new(pool.clone(), config));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let daemon = manager
        .clone()
        .run(shutdown.clone())
        .map_err(|e| format!("starting the daemon: {e}"))?;

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    emit(json!({"event": "ready", "pid": std::process::id(), "requests": n, "knobs": knobs}));
    wait_for_go(&mut stdin).await?;

    // The workload, timed like bench.baseline: upload, then create -> in_progress -> completed.
    let t_upload = Instant::now();
    let metadata = FileMetadata {
        filename: Some("bench.jsonl".into()),
        purpose: Some("batch".into()),
        size_bytes: Some(size_bytes),
        uploaded_by: Some(USER.into()),
        ..Default::default()
    };
    let items = std::iter::once(FileStreamItem::Metadata(metadata))
        .chain(templates.into_iter().map(FileStreamItem::Template));
    let file_id = match manager.create_file_stream(futures::stream::iter(items)).await {
        Ok(FileStreamResult::Success(id)) => id,
        Ok(FileStreamResult::Aborted) => return Err("create_file_stream aborted".into()),
        Err(e) => return Err(format!("create_file_stream: {e}")),
    };
    let upload_s = t_upload.elapsed().as_secs_f64();

    let t_create = Instant::now();
    let batch = manager
        .create_batch_record(BatchInput {
            file_id,
            endpoint: "/v1/chat/completions".into(),
            completion_window: args.completion_window.clone(),
            metadata: None,
            created_by: Some(USER.into()),
            api_key_id: None,
            api_key: None,
            total_requests: Some(n),
        })
        .await
        .map_err(|e| format!("create_batch_record: {e}"))?;
    let batch_id = batch.id;
    // A batch API answers "validating" at once and populates in the background.
    let populate = {
        let manager = manager.clone();
        tokio::spawn(async move { manager.populate_batch(batch_id, file_id).await })
    };

    let deadline = t_create + Duration::from_secs(args.timeout_s);
    let mut batch = batch;
    while batch.requests_started_at.is_none() {
        if populate.is_finished() && batch.failed_at.is_some() {
            return Err(format!("batch {} failed while populating", *batch_id));
        }
        if Instant::now() > deadline {
            return Err("batch not populated before --timeout-s".into());
        }
        tokio::time::sleep(START_POLL).await;
        batch = manager.get_batch(batch_id).await.map_err(|e| format!("get_batch: {e}"))?;
    }
    let to_in_progress_s = t_create.elapsed().as_secs_f64();
    populate
        .await
        .map_err(|e| format!("populate task: {e}"))?
        .map_err(|e| format!("populate_batch: {e}"))?;
    let mut last_log = Instant::now();
    // get_batch counts the rows and stamps completed_at once every row is terminal.
    while batch.completed_at.is_none() && batch.failed_at.is_none() {
        if Instant::now() > deadline {
            return Err(format!(
                "batch not completed before --timeout-s ({} completed, {} failed of {n})",
                batch.completed_requests, batch.failed_requests
            ));
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "[harness] {} completed, {} failed, {} in progress of {n} ({:.0} req/s)",
                batch.completed_requests,
                batch.failed_requests,
                batch.in_progress_requests,
                batch.completed_requests as f64 / t_create.elapsed().as_secs_f64()
            );
            last_log = Instant::now();
        }
        tokio::time::sleep(RUN_POLL).await;
        batch = manager.get_batch(batch_id).await.map_err(|e| format!("get_batch: {e}"))?;
    }
    let elapsed_s = t_create.elapsed().as_secs_f64();
    emit(json!({"event": "completed", "elapsed_s": round(elapsed_s, 3)}));
    wait_for_go(&mut stdin).await?;

    shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(15), daemon).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("[harness] daemon ended with an error: {e}"),
        Ok(Err(e)) => eprintln!("[harness] daemon task: {e}"),
        Err(_) => eprintln!("[harness] daemon did not stop within 15 s"),
    }
    let row = sqlx::query(ROW_STATS)
        .bind(*batch_id)
        .fetch_one(&pool)
        .await
        .map_err(|e| format!("row stats: {e}"))?;
    let (run_p50, run_p99) = pct(&row, "run");
    let (queue_p50, queue_p99) = pct(&row, "queue");
    let (call_p50, call_p99) = pct(&row, "call");
    emit(json!({
        "event": "result",
        "knobs": knobs,
        "batch_id": batch_id.to_string(),
        "total": n,
        "completed": row.get::<i64, _>("completed"),
        "failed": row.get::<i64, _>("failed"),
        "rows": row.get::<i64, _>("total"),
        "upload_s": round(upload_s, 3),
        "create_to_in_progress_s": round(to_in_progress_s, 3),
        "create_to_completed_s": round(elapsed_s, 3),
        "requests_per_s": round(n as f64 / elapsed_s, 1),
        "claim_to_complete_p50_ms": run_p50,
        "claim_to_complete_p99_ms": run_p99,
        "claim_to_complete_max_ms": opt(&row, "run_max", 1),
        "claim_to_start_p50_ms": queue_p50,
        "claim_to_start_p99_ms": queue_p99,
        "start_to_complete_p50_ms": call_p50,
        "start_to_complete_p99_ms": call_p99,
        "timeline_s": {
            "populated": opt(&row, "populated", 3),
            "first_claim": opt(&row, "first_claim", 3),
            "last_claim": opt(&row, "last_claim", 3),
            "last_complete": opt(&row, "last_complete", 3),
            "batch_completed": opt(&row, "batch_completed", 3),
        },
    }));
    pool.close().await;
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(args.log_level)
        .init();
    if let Err(e) = run(args).await {
        eprintln!("[harness] error: {e}");
        emit(json!({"event": "error", "message": e}));
        std::process::exit(1);
    }
}
