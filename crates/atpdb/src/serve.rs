//! `atpdb serve`: the sync engine and its HTTP API in one process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use atpdb_deliver::{Delivery, DeliveryConfig, Mode as DeliveryMode, WebhookConfig};
use atpdb_fleet::sink::Sink;
use atpdb_identity::{IdentityConfig, Network, NetworkConfig};
use atpdb_net::{HttpConfig, XrpcConfig};
use atpdb_store::Store;
use atpdb_sync::{Engine, EngineConfig, Filters, Mode, Pattern};
use clap::Args;

/// Options of `atpdb serve`. Each has an `ATPDB_*` environment name; where Tap has a
/// setting of the same meaning, its `TAP_*` name works too.
#[derive(Debug, Clone, Args)]
pub(crate) struct ServeArgs {
    /// The data directory (one process at a time).
    #[arg(long, env = "ATPDB_DATA_DIR", default_value = "./atpdb.data")]
    data_dir: PathBuf,
    /// Address of the HTTP API [TAP_BIND].
    #[arg(long, env = "ATPDB_BIND")]
    bind: Option<String>,
    /// The relay (or a single PDS) to follow and crawl [TAP_RELAY_URL].
    #[arg(long, env = "ATPDB_RELAY_URL")]
    relay_url: Option<String>,
    /// The PLC directory [TAP_PLC_URL].
    #[arg(long, env = "ATPDB_PLC_URL")]
    plc_url: Option<String>,
    /// Track every active repo on the network [TAP_FULL_NETWORK].
    #[arg(long, env = "ATPDB_FULL_NETWORK")]
    full_network: Option<bool>,
    /// Track repos that write these collections (comma-separated; `fm.teal.*` allowed)
    /// [TAP_SIGNAL_COLLECTION].
    #[arg(long, env = "ATPDB_SIGNAL_COLLECTION")]
    signal_collection: Option<String>,
    /// Keep only these collections (comma-separated; wildcards at segment boundaries)
    /// [TAP_COLLECTION_FILTERS].
    #[arg(long, env = "ATPDB_COLLECTION_FILTERS")]
    collection_filters: Option<String>,
    /// Repos fetched at once [TAP_RESYNC_PARALLELISM].
    #[arg(long, env = "ATPDB_RESYNC_PARALLELISM")]
    resync_parallelism: Option<usize>,
    /// Firehose workers [TAP_FIREHOSE_PARALLELISM].
    #[arg(long, env = "ATPDB_FIREHOSE_PARALLELISM")]
    firehose_parallelism: Option<usize>,
    /// Require HTTP Basic `admin:<password>` on every route [TAP_ADMIN_PASSWORD].
    #[arg(long, env = "ATPDB_ADMIN_PASSWORD")]
    admin_password: Option<String>,
    /// Allow loopback and private addresses for PDSes, did:web hosts and the relay (the
    /// devnet needs it; never on a public deployment).
    #[arg(long, env = "ATPDB_ALLOW_PRIVATE_NETWORK")]
    allow_private_network: bool,
    /// How far back the relay replays, in hours; an older cursor catches up by resync.
    #[arg(long, env = "ATPDB_REPLAY_WINDOW_HOURS", default_value_t = 72)]
    replay_window_hours: u64,
    /// Longest wait between retries of a failing repo, in seconds.
    #[arg(long, env = "ATPDB_MAX_BACKOFF_SECS", default_value_t = 3600)]
    max_backoff_secs: u64,
    /// First wait after a failing repo, in seconds.
    #[arg(long, env = "ATPDB_MIN_BACKOFF_SECS", default_value_t = 60)]
    min_backoff_secs: u64,
    /// Do not follow the firehose (backfill only).
    #[arg(long, env = "ATPDB_NO_FIREHOSE")]
    no_firehose: bool,
    /// A DNS server for handle lookups (`_atproto` TXT records), e.g. the devnet's; the
    /// system resolver otherwise.
    #[arg(long, env = "ATPDB_DNS_NAMESERVER")]
    dns_nameserver: Option<std::net::SocketAddr>,
    /// Fetch did:web documents over plain http (a test network's hosts have no TLS).
    #[arg(long, env = "ATPDB_DID_WEB_HTTP")]
    did_web_http: bool,
    /// Bytes of a fetched repo's blocks kept in memory, in MiB; the rest spills to a file in
    /// the data directory. (Almost every repo fits; a 1 GB one then peaks near 220 MB in
    /// all.)
    #[arg(long, env = "ATPDB_MEMORY_BUDGET_MB", default_value_t = 16)]
    memory_budget_mb: usize,
    /// Acknowledge an event as soon as it is written to a socket [TAP_DISABLE_ACKS].
    #[arg(long, env = "ATPDB_DISABLE_ACKS")]
    disable_acks: Option<bool>,
    /// POST events to this URL instead of serving them on /channel [TAP_WEBHOOK_URL].
    #[arg(long, env = "ATPDB_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// Sign webhook bodies with HMAC-SHA256 under this secret (header `x-atpdb-signature`).
    #[arg(long, env = "ATPDB_WEBHOOK_SECRET")]
    webhook_secret: Option<String>,
    /// Events per webhook request; above 1 the body is a JSON array.
    #[arg(long, env = "ATPDB_WEBHOOK_BATCH", default_value_t = 1)]
    webhook_batch: usize,
    /// Re-send an event not acknowledged for this long, e.g. `60s`, `500ms`, `2m`
    /// [TAP_RETRY_TIMEOUT].
    #[arg(long, env = "ATPDB_RETRY_TIMEOUT")]
    retry_timeout: Option<String>,
    /// Outbox events held in memory for delivery at once [TAP_OUTBOX_CAPACITY].
    #[arg(long, env = "ATPDB_OUTBOX_CAPACITY")]
    outbox_capacity: Option<usize>,
    /// Only deliver what the outbox holds: no firehose, backfill or crawler
    /// [TAP_OUTBOX_ONLY].
    #[arg(long, env = "ATPDB_OUTBOX_ONLY")]
    outbox_only: Option<bool>,
    /// Undelivered events the outbox may hold before the firehose and backfills pause for
    /// consumers to catch up (0: no limit; the outbox then grows on disk while nobody
    /// consumes).
    #[arg(long, env = "ATPDB_OUTBOX_LIMIT", default_value_t = 1_000_000)]
    outbox_limit: u64,
    /// Events /stream (and /subscribe) can replay whatever delivery did with them: the
    /// newest this many (0: no retention; streams then replay what the outbox still holds).
    #[arg(long, env = "ATPDB_RETAIN_EVENTS", default_value_t = 100_000)]
    retain_events: u64,
    /// ... and none older than this many hours.
    #[arg(long, env = "ATPDB_RETAIN_HOURS", default_value_t = 24)]
    retain_hours: u64,
    /// Also write every event to this Redis, as the fleet's stream (rsky's format), for
    /// `atpdb fleet index` or rsky's indexers. The sink reads the outbox from its own
    /// cursor (kept in Redis with the entries) and does not acknowledge events: events
    /// /channel acknowledged before it read them are gone unless retained
    /// (--retain-events); with no /channel consumer, let the sinks acknowledge the
    /// outbox (--sink-acks), or it fills to --outbox-limit and the engine pauses.
    #[arg(long = "redis", env = "ATPDB_REDIS_URL", value_name = "URL")]
    redis_url: Option<String>,
    /// The stream --redis writes.
    #[arg(long, env = "ATPDB_REDIS_STREAM", default_value = "firehose_live")]
    redis_stream: String,
    /// --redis waits while its stream holds this many entries (its indexers are behind).
    #[arg(long, env = "ATPDB_REDIS_HIGH_WATER_MARK", default_value_t = 100_000)]
    redis_high_water_mark: u64,
    /// Also write every event into the fleet indexer's PostgreSQL tables (`record`, the
    /// typed tables, `repo`), the cursor kept in the same transactions (`sink_cursor`).
    #[arg(long = "postgres", env = "ATPDB_POSTGRES_URL", value_name = "URL")]
    postgres_url: Option<String>,
    /// The name a sink's cursor is kept under, for several servers sharing a stream or a
    /// database.
    #[arg(long, env = "ATPDB_SINK_NAME", default_value = "atpdb")]
    sink_name: String,
    /// The sinks are the outbox's consumers: an event is acknowledged (and leaves the
    /// outbox, so --outbox-limit never pauses the engine for want of a /channel consumer)
    /// once every sink has written it. Not for use beside /channel consumers, which would
    /// then miss what the sinks acknowledged.
    #[arg(long, env = "ATPDB_SINK_ACKS")]
    sink_acks: bool,
    /// Events one /channel socket may hold unacknowledged (0: no limit). Set 1 for
    /// `@atproto/tap` 0.3.x clients that must survive a server crash: they hang when their
    /// socket drops while they hold more than the event in hand.
    #[arg(long, env = "ATPDB_CHANNEL_WINDOW", default_value_t = 0)]
    channel_window: usize,
    /// Also deliver repo-state events (`"type":"repo"`: errored, desynchronized, resynced)
    /// on /channel; Tap's own clients refuse them, so they are off by default.
    #[arg(long, env = "ATPDB_REPO_EVENTS")]
    repo_events: bool,
    /// Log format: human or json.
    #[arg(long, env = "ATPDB_LOG_FORMAT", default_value = "human")]
    log_format: String,
}

/// The `TAP_*` fallback for a setting given neither as a flag nor as `ATPDB_*`.
fn tap_env(value: Option<String>, name: &str) -> Option<String> {
    value.or_else(|| std::env::var(name).ok().filter(|value| !value.is_empty()))
}

fn tap_env_parsed<T: std::str::FromStr>(value: Option<T>, name: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    match value {
        Some(value) => Ok(Some(value)),
        None => match std::env::var(name).ok().filter(|value| !value.is_empty()) {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|err| anyhow::anyhow!("{name}={text:?}: {err}")),
        },
    }
}

pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    crate::logging::init(&args.log_format)?;
    crate::bound_freed_memory();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

fn engine_config(args: &ServeArgs) -> anyhow::Result<EngineConfig> {
    let relay_url = tap_env(args.relay_url.clone(), "TAP_RELAY_URL")
        .unwrap_or_else(|| "https://relay1.us-east.bsky.network".to_owned());
    let full = tap_env_parsed(args.full_network, "TAP_FULL_NETWORK")?.unwrap_or(false);
    let signals = match tap_env(args.signal_collection.clone(), "TAP_SIGNAL_COLLECTION") {
        Some(text) => text
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(str::parse::<Pattern>)
            .collect::<Result<Vec<_>, _>>()
            .context("--signal-collection")?,
        None => Vec::new(),
    };
    let mode = if full {
        Mode::Full
    } else if !signals.is_empty() {
        Mode::Signal(signals)
    } else {
        Mode::Manual
    };
    let filters = match tap_env(args.collection_filters.clone(), "TAP_COLLECTION_FILTERS") {
        Some(text) => Filters::parse_list(&text).context("--collection-filters")?,
        None => Filters::all(),
    };
    let mut config = EngineConfig {
        relay_url,
        mode,
        filters,
        replay_window: Duration::from_secs(args.replay_window_hours.saturating_mul(3600)),
        backoff_min: Duration::from_secs(args.min_backoff_secs),
        backoff_max: Duration::from_secs(args.max_backoff_secs),
        follow_firehose: !args.no_firehose,
        outbox_limit: args.outbox_limit,
        ..EngineConfig::default()
    };
    if let Some(parallelism) = tap_env_parsed(args.resync_parallelism, "TAP_RESYNC_PARALLELISM")? {
        config.resync_parallelism = parallelism.max(1);
    }
    if let Some(parallelism) =
        tap_env_parsed(args.firehose_parallelism, "TAP_FIREHOSE_PARALLELISM")?
    {
        config.firehose_parallelism = parallelism.max(1);
    }
    // Snapshots larger than the memory budget spill next to the data, not into /tmp.
    config.verify.spill_dir = Some(args.data_dir.clone());
    config.verify.memory_budget = args.memory_budget_mb.saturating_mul(1 << 20);
    Ok(config)
}

/// A Go-style duration as Tap's settings take it (`60s`, `500ms`, `1m30s`, `1h`); a bare
/// number is seconds.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| anyhow::anyhow!("{text:?}: a number needs a unit (h, m, s, ms)"))?;
        let (number, tail) = rest.split_at(digits);
        let number: f64 = number
            .parse()
            .map_err(|_| anyhow::anyhow!("{text:?}: not a duration"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            _ => anyhow::bail!("{text:?}: unknown unit {unit:?} (h, m, s, ms)"),
        };
        total += Duration::try_from_secs_f64(number * seconds)
            .map_err(|_| anyhow::anyhow!("{text:?}: out of range"))?;
        rest = tail;
    }
    Ok(total)
}

fn delivery_config(args: &ServeArgs) -> anyhow::Result<DeliveryConfig> {
    let mut config = DeliveryConfig {
        repo_events: args.repo_events,
        window: args.channel_window,
        ..DeliveryConfig::default()
    };
    if let Some(text) = tap_env(args.retry_timeout.clone(), "TAP_RETRY_TIMEOUT") {
        config.retry_timeout = parse_duration(&text).context("--retry-timeout")?;
    }
    if let Some(capacity) = tap_env_parsed(args.outbox_capacity, "TAP_OUTBOX_CAPACITY")? {
        config.capacity = capacity.max(1);
    }
    let disable_acks = tap_env_parsed(args.disable_acks, "TAP_DISABLE_ACKS")?.unwrap_or(false);
    config.mode = match tap_env(args.webhook_url.clone(), "TAP_WEBHOOK_URL") {
        // As Tap: a webhook takes precedence over disabled acks.
        Some(url) => {
            let mut webhook = WebhookConfig::new(url);
            webhook.admin_password = tap_env(args.admin_password.clone(), "TAP_ADMIN_PASSWORD");
            webhook.secret = args.webhook_secret.clone().map(String::into_bytes);
            webhook.batch = args.webhook_batch.max(1);
            DeliveryMode::Webhook(webhook)
        }
        None if disable_acks => DeliveryMode::FireAndForget,
        None => DeliveryMode::Ack,
    };
    Ok(config)
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let data_dir = args.data_dir.clone();
    serve_with(args, |_, url| announce(url, &data_dir)).await
}

/// The one line a script (or a test) can wait for: the API listens at `url`.
pub(crate) fn announce(url: &str, data_dir: &std::path::Path) {
    println!(
        "{}",
        serde_json::json!({ "url": url, "data_dir": data_dir })
    );
}

impl ServeArgs {
    /// These options for an engine inside another command (the REPL): following `relay`
    /// when given, and on a free loopback port unless `--bind` chose one.
    pub(crate) fn embedded(mut self, relay: Option<String>) -> ServeArgs {
        if relay.is_some() {
            self.relay_url = relay;
        }
        if self.bind.is_none() {
            self.bind = Some("127.0.0.1:0".to_owned());
        }
        self
    }

    pub(crate) fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The admin password, from the flag, `ATPDB_ADMIN_PASSWORD` or `TAP_ADMIN_PASSWORD`.
    pub(crate) fn admin_password(&self) -> Option<String> {
        tap_env(self.admin_password.clone(), "TAP_ADMIN_PASSWORD")
    }

    pub(crate) fn log_format(&self) -> &str {
        &self.log_format
    }
}

/// `atpdb serve`, calling `on_ready` with the engine and the API's URL once the API
/// listens (`atpdb demo` shows progress from there).
pub(crate) async fn serve_with(
    args: ServeArgs,
    on_ready: impl FnOnce(&Engine, &str),
) -> anyhow::Result<ExitCode> {
    let config = engine_config(&args)?;
    let delivery_config = delivery_config(&args)?;
    let outbox_only = tap_env_parsed(args.outbox_only, "TAP_OUTBOX_ONLY")?.unwrap_or(false);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let store = Store::open(&args.data_dir)
        .with_context(|| format!("opening the store in {}", args.data_dir.display()))?;
    let plc_url = tap_env(args.plc_url.clone(), "TAP_PLC_URL")
        .unwrap_or_else(|| "https://plc.directory".to_owned());
    let network = Network::new(NetworkConfig {
        http: HttpConfig {
            allow_private_network: args.allow_private_network,
            ..HttpConfig::default()
        },
        identity: IdentityConfig {
            plc_url,
            dns_nameserver: args.dns_nameserver,
            did_web_scheme: if args.did_web_http { "http" } else { "https" }.to_owned(),
            ..IdentityConfig::default()
        },
        xrpc: XrpcConfig::default(),
    })?;
    let engine = Engine::new(config, store.clone(), network);
    let mut tasks = if outbox_only {
        tracing::info!("serve.outbox_only");
        atpdb_sync::EngineTasks::new()
    } else {
        engine.start()?
    };
    // Delivery stops with the engine; its sockets are dropped without a close frame, so
    // Tap's clients reconnect to the next run.
    let mode = delivery_config.mode.name();
    let (delivery, delivery_task) =
        Delivery::start(store.clone(), delivery_config, engine.shutdown_token())?;
    tasks.spawn(beside_engine("delivery", delivery_task));
    tracing::info!(mode, "delivery.started");
    if args.retain_events > 0 {
        let retention = atpdb_deliver::Retention {
            max_events: args.retain_events,
            max_age: Duration::from_secs(args.retain_hours.saturating_mul(3600)),
        };
        let trimmer = atpdb_deliver::retain(store.clone(), retention, engine.shutdown_token());
        tasks.spawn(beside_engine("event retention", trimmer));
    }

    let mut sinks = Vec::new();
    if let Some(url) = &args.redis_url {
        let target = SinkTarget::Redis {
            url: url.clone(),
            stream: args.redis_stream.clone(),
            high_water: args.redis_high_water_mark,
        };
        sinks.push(("redis sink", target));
    }
    if let Some(url) = &args.postgres_url {
        sinks.push(("postgres sink", SinkTarget::Postgres { url: url.clone() }));
    }
    if args.sink_acks && sinks.is_empty() {
        anyhow::bail!("--sink-acks needs a sink (--redis or --postgres)");
    }
    // Where each sink has written up to; with --sink-acks, the outbox is acknowledged up to
    // the lowest.
    let (written, progress) = tokio::sync::watch::channel(vec![0u64; sinks.len()]);
    let written = std::sync::Arc::new(written);
    for (slot, (task, target)) in sinks.into_iter().enumerate() {
        tasks.spawn(run_sink(
            task,
            target,
            args.sink_name.clone(),
            store.clone(),
            engine.shutdown_token(),
            (slot, written.clone()),
        ));
    }
    if args.sink_acks {
        tasks.spawn(acknowledge_written(
            store.clone(),
            delivery.clone(),
            progress,
            engine.shutdown_token(),
        ));
    }

    let bind =
        tap_env(args.bind.clone(), "TAP_BIND").unwrap_or_else(|| "127.0.0.1:2480".to_owned());
    // Tap's default is ":2480"; that form means every interface.
    let bind = match bind.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => bind,
    };
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .with_context(|| format!("binding {bind}"))?;
    let address = listener.local_addr().context("reading the bound address")?;
    let router = atpdb_server::router(
        engine.clone(),
        delivery,
        atpdb_server::ServerConfig {
            admin_password: tap_env(args.admin_password.clone(), "TAP_ADMIN_PASSWORD"),
        },
    );
    let shutdown = engine.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown_signal(&shutdown).await })
            .await
    });
    tracing::info!(url = %format!("http://{address}"), "serve.ready");
    on_ready(&engine, &format!("http://{address}"));

    let mut failed = false;
    while let Some(ended) = tasks.join_next().await {
        match ended {
            Ok((_, Ok(()))) if engine.is_shutting_down() => {}
            Ok((task, Ok(()))) => {
                tracing::error!(task, "serve: an engine task ended early; stopping");
                failed = true;
                engine.shutdown();
            }
            Ok((task, Err(err))) => {
                tracing::error!(task, %err, "serve: an engine task failed; stopping");
                failed = true;
                engine.shutdown();
            }
            Err(err) => {
                tracing::error!(%err, "serve: an engine task panicked; stopping");
                failed = true;
                engine.shutdown();
            }
        }
    }
    engine.shutdown();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::error!(%err, "serve: the HTTP server failed"),
        Err(err) => tracing::error!(%err, "serve: the HTTP server panicked"),
    }
    store.persist().context("flushing the store")?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Where a sink writes (opened again after a transient failure).
enum SinkTarget {
    Redis {
        url: String,
        stream: String,
        high_water: u64,
    },
    Postgres {
        url: String,
    },
}

/// A sink beside the engine: restarted with backoff when Redis or PostgreSQL go away (it
/// resumes from its cursor), reported like an engine task when it fails for good.
async fn run_sink(
    task: &'static str,
    target: SinkTarget,
    name: String,
    store: Store,
    shutdown: tokio_util::sync::CancellationToken,
    (slot, written): (usize, std::sync::Arc<tokio::sync::watch::Sender<Vec<u64>>>),
) -> (&'static str, Result<(), atpdb_sync::SyncError>) {
    let report = move |through: u64| {
        written.send_modify(|positions| {
            if let Some(position) = positions.get_mut(slot) {
                *position = through;
            }
        });
    };
    let ended = crate::fleet::supervise(task, &shutdown, || {
        let (target, name, store, shutdown, report) =
            (&target, &name, store.clone(), &shutdown, &report);
        async move {
            let mut sink = match target {
                SinkTarget::Redis {
                    url,
                    stream,
                    high_water,
                } => Sink::redis(
                    atpdb_fleet::connect(url).await?,
                    stream.clone(),
                    *high_water,
                ),
                SinkTarget::Postgres { url } => Sink::postgres(url).await?,
            };
            atpdb_fleet::sink::run(&mut sink, name, store, shutdown, report).await
        }
    })
    .await;
    (
        task,
        ended.map(drop).map_err(|err| atpdb_sync::SyncError::Task {
            task,
            reason: err.to_string(),
        }),
    )
}

/// `--sink-acks`: acknowledges every outbox event each sink has written, so the sinks
/// consume the outbox as /channel consumers would.
async fn acknowledge_written(
    store: Store,
    delivery: Delivery,
    mut progress: tokio::sync::watch::Receiver<Vec<u64>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> (&'static str, Result<(), atpdb_sync::SyncError>) {
    const TASK: &str = "sink acknowledgements";
    let mut acked = 0u64;
    loop {
        let written = progress
            .borrow_and_update()
            .iter()
            .copied()
            .min()
            .unwrap_or(0);
        while acked < written {
            let reader = store.clone();
            let page =
                match tokio::task::spawn_blocking(move || reader.events_after(acked, 1024)).await {
                    Ok(Ok(page)) => page,
                    Ok(Err(err)) => {
                        let reason = err.to_string();
                        return (
                            TASK,
                            Err(atpdb_sync::SyncError::Task { task: TASK, reason }),
                        );
                    }
                    Err(err) => {
                        let reason = err.to_string();
                        return (
                            TASK,
                            Err(atpdb_sync::SyncError::Task { task: TASK, reason }),
                        );
                    }
                };
            let before = acked;
            for (id, _) in page.iter().take_while(|(id, _)| *id <= written) {
                delivery.ack(*id);
                acked = *id;
            }
            if acked == before {
                // Nothing left in the outbox up to `written`.
                acked = written;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return (TASK, Ok(())),
            changed = progress.changed() => if changed.is_err() {
                return (TASK, Ok(()));
            },
        }
    }
}

/// A task that runs beside the engine's, reported the way the engine's are, so that its
/// failure stops the process like theirs.
async fn beside_engine(
    task: &'static str,
    handle: tokio::task::JoinHandle<Result<(), atpdb_deliver::DeliveryError>>,
) -> (&'static str, Result<(), atpdb_sync::SyncError>) {
    let ended = match handle.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(err) => Err(format!("panicked: {err}")),
    };
    (
        task,
        ended.map_err(|reason| atpdb_sync::SyncError::Task { task, reason }),
    )
}

async fn shutdown_signal(engine: &Engine) {
    tokio::select! {
        () = interrupted() => {}
        () = async { while !engine.is_shutting_down() { tokio::time::sleep(Duration::from_millis(200)).await } } => {}
    }
    engine.shutdown();
}

/// Returns on Ctrl-C or SIGTERM.
pub(crate) async fn interrupted() {
    let terminate = async {
        #[cfg(unix)]
        if let Ok(mut signal) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            signal.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
