//! `atpdb fleet`: the scale-out stages on Redis Streams (see `atpdb_fleet`). Each stage is
//! one process; run as many backfill workers as the machines allow, each with its own
//! `--consumer`. The seeds' environment names work (REDIS_URL, INGESTER_*, BACKFILLER_*).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use atpdb_fleet::backfill::{self, BackfillConfig};
use atpdb_fleet::enumerate::{self, EnumerateConfig};
use atpdb_fleet::index::{self, IndexConfig};
use atpdb_fleet::ingest::{self, IngestConfig};
use atpdb_fleet::labels::{self, LabelsConfig};
use atpdb_fleet::status::{self, StatusConfig};
use atpdb_identity::{IdentityConfig, Network, NetworkConfig};
use atpdb_net::{HttpConfig, XrpcConfig};
use atpdb_repo::verify::VerifyOptions;
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

/// The fleet's stages.
#[derive(Debug, Subcommand)]
pub(crate) enum FleetCommand {
    /// List every repo of the relays into `repo_backfill` (rsky's BackfillIngester).
    Enumerate(EnumerateArgs),
    /// Backfill the repos of `repo_backfill`, verified, into `firehose_backfill` (rsky's
    /// RepoBackfiller); one consumer of a group, run as many as you like.
    Backfill(BackfillArgs),
    /// Follow a relay's firehose, verified, into `firehose_live` (rsky's FirehoseIngester);
    /// one per relay.
    Ingest(IngestArgs),
    /// Follow labelers' `subscribeLabels`, each label's signature checked, into
    /// `label_live` (rsky's LabelerIngester).
    Labels(LabelsArgs),
    /// Index the event streams into PostgreSQL (rsky's StreamIndexer); one consumer of a
    /// group per stream, run as many as you like.
    Index(IndexArgs),
    /// Stream lengths, pending entries and lag per group and consumer, cursors, parked
    /// errors and rows per table; with `--listen`, the same on `/metrics`.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    common: Common,
    /// PostgreSQL, for rows per table (optional).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Streams to report on (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "repo_backfill,firehose_backfill,firehose_live,label_live"
    )]
    streams: Vec<String>,
    /// Streams of parked entries (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "repo_backfill_errors")]
    error_streams: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Serve the figures as Prometheus text on `http://ADDR/metrics` until interrupted,
    /// read afresh on each request.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub(crate) struct IngestArgs {
    #[command(flatten)]
    common: Common,
    /// The relay: a bare hostname (https) or a URL.
    #[arg(long, env = "ATPDB_RELAY_URL", default_value = "bsky.network")]
    relay: String,
    /// The stream written.
    #[arg(long, env = "FIREHOSE_STREAM", default_value = "firehose_live")]
    stream: String,
    /// Where repos whose chain broke are queued for a fresh snapshot.
    #[arg(long, env = "INGESTER_STREAM", default_value = "repo_backfill")]
    resync_stream: String,
    /// Pause while the stream holds this many entries.
    #[arg(
        long,
        env = "FIREHOSE_STREAM_HIGH_WATER_MARK",
        default_value_t = 1_000_000
    )]
    high_water_mark: u64,
    /// Events verified at once.
    #[arg(long, env = "ATPDB_FIREHOSE_PARALLELISM", default_value_t = 64)]
    parallelism: usize,
}

#[derive(Debug, Args)]
pub(crate) struct LabelsArgs {
    #[command(flatten)]
    common: Common,
    /// The labelers' DIDs (comma-separated); each DID document names the labeler's
    /// endpoint (`#atproto_labeler`) and signing key (`#atproto_label`).
    #[arg(long, env = "LABELER_DIDS", value_delimiter = ',', required = true)]
    labelers: Vec<String>,
    /// The stream written.
    #[arg(long, env = "LABEL_STREAM", default_value = "label_live")]
    stream: String,
    /// Pause while the stream holds this many entries.
    #[arg(
        long,
        env = "LABEL_STREAM_HIGH_WATER_MARK",
        default_value_t = 1_000_000
    )]
    high_water_mark: u64,
}

#[derive(Debug, Args)]
pub(crate) struct IndexArgs {
    #[command(flatten)]
    common: Common,
    /// PostgreSQL (`postgresql://user@host/db`); the tables are created if missing.
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// The streams read (comma-separated).
    #[arg(
        long,
        env = "INDEXER_STREAMS",
        value_delimiter = ',',
        default_value = "firehose_live,firehose_backfill,label_live"
    )]
    streams: Vec<String>,
    /// The consumer group.
    #[arg(long, env = "INDEXER_GROUP", default_value = "firehose_group")]
    group: String,
    /// This indexer's name in the group: unique per indexer.
    #[arg(long, env = "INDEXER_CONSUMER", default_value = "indexer_1")]
    consumer: String,
    /// Entries per transaction.
    #[arg(long, env = "INDEXER_BATCH_SIZE", default_value_t = 1000)]
    batch_size: usize,
    /// Indexers in this process, each with its own PostgreSQL connection, named
    /// `CONSUMER`, `CONSUMER.2`, …: one keeps a database core busy about half the time
    /// (it waits while the indexer reads and parses the next batch).
    #[arg(long, env = "INDEXER_CONCURRENCY", default_value_t = 2)]
    concurrency: usize,
    /// Exit once nothing has been new for this many seconds (one-off runs).
    #[arg(long, env = "INDEXER_EXIT_WHEN_IDLE_SECS")]
    exit_when_idle_secs: Option<u64>,
    /// Take over entries another indexer has left unacknowledged this long, in seconds
    /// (it stopped).
    #[arg(long, env = "INDEXER_CLAIM_IDLE_SECS", default_value_t = 60)]
    claim_idle_secs: u64,
    /// Keep entries in the streams after indexing them (acknowledge only): for when another
    /// consumer group reads the same streams. By default they are deleted once indexed, so
    /// the streams do not grow past the stages' high-water marks.
    #[arg(long, env = "INDEXER_KEEP_ACKED")]
    keep_acked: bool,
}

/// Settings every stage shares.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// Redis.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The PLC directory.
    #[arg(long, env = "ATPDB_PLC_URL", default_value = "https://plc.directory")]
    plc_url: String,
    /// Allow loopback and private addresses for relays, PDSes and did:web hosts (a test
    /// network needs it; never on a public deployment).
    #[arg(long, env = "ATPDB_ALLOW_PRIVATE_NETWORK")]
    allow_private_network: bool,
    /// A DNS server for handle lookups; the system resolver otherwise.
    #[arg(long, env = "ATPDB_DNS_NAMESERVER")]
    dns_nameserver: Option<std::net::SocketAddr>,
    /// Log format: human or json.
    #[arg(long, env = "ATPDB_LOG_FORMAT", default_value = "human")]
    log_format: String,
}

#[derive(Debug, Args)]
pub(crate) struct EnumerateArgs {
    #[command(flatten)]
    common: Common,
    /// Relays to list (comma-separated): bare hostnames (https) or URLs.
    #[arg(
        long,
        env = "INGESTER_RELAY_HOSTS",
        value_delimiter = ',',
        required = true
    )]
    relay_hosts: Vec<String>,
    /// The stream written.
    #[arg(long, env = "INGESTER_STREAM", default_value = "repo_backfill")]
    stream: String,
    /// Entries per listing page (at most 1,000); a page and the cursor after it are
    /// written in one transaction.
    #[arg(long, env = "INGESTER_BATCH_SIZE", default_value_t = 500)]
    batch_size: usize,
    /// Accepted for the seed's settings: a page's entries are written when the page
    /// arrives, so no partial batch ever waits.
    #[arg(long, env = "INGESTER_BATCH_TIMEOUT_MS", default_value_t = 1000)]
    batch_timeout_ms: u64,
    /// Pause while the stream holds this many entries.
    #[arg(long, env = "INGESTER_HIGH_WATER_MARK", default_value_t = 1_000_000)]
    high_water_mark: u64,
    /// List again this long after a listing ends, for repos created since; 0: list once
    /// and exit.
    #[arg(long, env = "INGESTER_RECHECK_SECS", default_value_t = 300)]
    recheck_secs: u64,
}

#[derive(Debug, Args)]
pub(crate) struct BackfillArgs {
    #[command(flatten)]
    common: Common,
    /// This worker's name in the consumer group: unique per worker.
    #[arg(long, env = "BACKFILLER_CONSUMER", default_value = "backfiller_1")]
    consumer: String,
    /// The stream read.
    #[arg(
        long,
        env = "BACKFILLER_BACKFILL_STREAM",
        default_value = "repo_backfill"
    )]
    backfill_stream: String,
    /// The stream written.
    #[arg(
        long,
        env = "BACKFILLER_FIREHOSE_STREAM",
        default_value = "firehose_backfill"
    )]
    firehose_stream: String,
    /// Where entries that keep failing are parked, with the reason.
    #[arg(
        long,
        env = "BACKFILLER_ERRORS_STREAM",
        default_value = "repo_backfill_errors"
    )]
    errors_stream: String,
    /// The consumer group.
    #[arg(long, env = "BACKFILLER_GROUP", default_value = "repo_backfill_group")]
    group: String,
    /// Repos backfilled at once.
    #[arg(long, env = "BACKFILLER_CONCURRENCY", default_value_t = 2)]
    concurrency: usize,
    /// Pause while the output stream holds this many entries.
    #[arg(
        long,
        env = "BACKFILLER_FIREHOSE_STREAM_HIGH_WATER_MARK",
        default_value_t = 100_000
    )]
    high_water_mark: u64,
    /// Attempts before an entry is parked.
    #[arg(long, env = "BACKFILLER_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// Take over entries pending this long on a worker that stopped, in seconds.
    #[arg(long, env = "BACKFILLER_CLAIM_IDLE_SECS", default_value_t = 60)]
    claim_idle_secs: u64,
    /// Exit once nothing has been pending or new for this many seconds (one-off runs).
    #[arg(long, env = "BACKFILLER_EXIT_WHEN_IDLE_SECS")]
    exit_when_idle_secs: Option<u64>,
    /// Bytes of a fetched repo's blocks kept in memory, in MiB; the rest spills to a
    /// temporary file.
    #[arg(long, env = "ATPDB_MEMORY_BUDGET_MB", default_value_t = 16)]
    memory_budget_mb: usize,
}

pub(crate) fn run(command: FleetCommand) -> anyhow::Result<ExitCode> {
    let format = match &command {
        FleetCommand::Enumerate(args) => &args.common.log_format,
        FleetCommand::Backfill(args) => &args.common.log_format,
        FleetCommand::Ingest(args) => &args.common.log_format,
        FleetCommand::Labels(args) => &args.common.log_format,
        FleetCommand::Index(args) => &args.common.log_format,
        FleetCommand::Status(args) => &args.common.log_format,
    };
    crate::logging::init(format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            crate::serve::interrupted().await;
            on_signal.cancel();
        });
        match command {
            FleetCommand::Enumerate(args) => run_enumerate(args, &shutdown).await,
            FleetCommand::Backfill(args) => run_backfill(args, shutdown).await,
            FleetCommand::Ingest(args) => run_ingest(args, &shutdown).await,
            FleetCommand::Labels(args) => run_labels(args, &shutdown).await,
            FleetCommand::Index(args) => run_index(args, &shutdown).await,
            FleetCommand::Status(args) => run_status(args, shutdown).await,
        }
    })
}

/// The clients every stage reaches hosts with.
fn network(common: &Common) -> anyhow::Result<Network> {
    Ok(Network::new(NetworkConfig {
        http: HttpConfig {
            allow_private_network: common.allow_private_network,
            ..HttpConfig::default()
        },
        identity: IdentityConfig {
            plc_url: common.plc_url.clone(),
            dns_nameserver: common.dns_nameserver,
            ..IdentityConfig::default()
        },
        xrpc: XrpcConfig::default(),
    })?)
}

/// Runs a stage, and runs it again after a transient failure (Redis restarted, a PostgreSQL
/// connection killed): every stage resumes from what it wrote (cursors, pending entries), so
/// this is what a process supervisor would do, minus the restart. The failure is logged
/// each time; any other error ends the process with it (non-zero), never a silent stall.
pub(crate) async fn supervise<T, F, Fut>(
    stage: &str,
    shutdown: &CancellationToken,
    mut run: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, atpdb_fleet::FleetError>>,
{
    const FIRST: Duration = Duration::from_millis(500);
    const MOST: Duration = Duration::from_secs(30);
    let mut backoff = FIRST;
    loop {
        let started = std::time::Instant::now();
        match run().await {
            Ok(done) => return Ok(done),
            Err(err) if err.is_transient() && !shutdown.is_cancelled() => {
                if started.elapsed() > MOST {
                    backoff = FIRST;
                }
                tracing::error!(
                    stage,
                    %err,
                    retry_in_ms = backoff.as_millis() as u64,
                    "fleet.stage_failed: restarting it"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Err(err.into()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MOST);
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// `relay.example` → `https://relay.example`; URLs are kept.
fn host_url(host: &str) -> String {
    let host = host.trim().trim_end_matches('/');
    if host.contains("://") {
        host.to_owned()
    } else {
        format!("https://{host}")
    }
}

async fn run_enumerate(
    args: EnumerateArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<ExitCode> {
    let Network { xrpc, .. } = network(&args.common)?;
    let redis = atpdb_fleet::connect(&args.common.redis_url)
        .await
        .with_context(|| format!("connecting to {}", args.common.redis_url))?;
    let config = EnumerateConfig {
        relays: args
            .relay_hosts
            .iter()
            .filter(|host| !host.trim().is_empty())
            .map(|host| host_url(host))
            .collect(),
        stream: args.stream,
        batch_size: args.batch_size.max(1),
        high_water: args.high_water_mark.max(1),
        recheck: (args.recheck_secs > 0).then(|| Duration::from_secs(args.recheck_secs)),
    };
    tracing::info!(relays = ?config.relays, stream = %config.stream, "enumerate.start");
    supervise("enumerate", shutdown, || {
        let (xrpc, mut redis, config) = (xrpc.clone(), redis.clone(), config.clone());
        async move { enumerate::run(&xrpc, &mut redis, &config, shutdown).await }
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_backfill(args: BackfillArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let Network {
        xrpc,
        resolver: identity,
        ..
    } = network(&args.common)?;
    let redis = atpdb_fleet::connect(&args.common.redis_url)
        .await
        .with_context(|| format!("connecting to {}", args.common.redis_url))?;
    let config = BackfillConfig {
        stream_in: args.backfill_stream,
        stream_out: args.firehose_stream,
        errors_stream: args.errors_stream,
        group: args.group,
        consumer: args.consumer,
        concurrency: args.concurrency.max(1),
        high_water: args.high_water_mark.max(1),
        max_attempts: args.max_attempts.max(1),
        claim_idle: Duration::from_secs(args.claim_idle_secs.max(1)),
        exit_when_idle: args.exit_when_idle_secs.map(Duration::from_secs),
        verify: VerifyOptions {
            memory_budget: args.memory_budget_mb << 20,
            ..VerifyOptions::default()
        },
        ..BackfillConfig::default()
    };
    tracing::info!(consumer = %config.consumer, group = %config.group, "backfill.start");
    let done = supervise("backfill", &shutdown.clone(), || {
        backfill::run(
            xrpc.clone(),
            identity.clone(),
            redis.clone(),
            config.clone(),
            shutdown.clone(),
        )
    })
    .await?;
    tracing::info!(
        repos = done.repos,
        records = done.records,
        failures = done.failures,
        parked = done.parked,
        claimed = done.claimed,
        "backfill.stopped"
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_ingest(args: IngestArgs, shutdown: &CancellationToken) -> anyhow::Result<ExitCode> {
    let Network {
        http,
        resolver: identity,
        ..
    } = network(&args.common)?;
    let redis = atpdb_fleet::connect(&args.common.redis_url)
        .await
        .with_context(|| format!("connecting to {}", args.common.redis_url))?;
    let config = IngestConfig {
        relay: host_url(&args.relay),
        stream: args.stream,
        resync_stream: args.resync_stream,
        high_water: args.high_water_mark.max(1),
        parallelism: args.parallelism.max(1),
        ..IngestConfig::default()
    };
    let done = supervise("ingest", shutdown, || {
        let (http, identity, redis, config) = (
            http.clone(),
            identity.clone(),
            redis.clone(),
            config.clone(),
        );
        async move { ingest::run(&http, identity, redis, &config, shutdown).await }
    })
    .await?;
    tracing::info!(
        commits = done.commits,
        events = done.events,
        stale = done.stale,
        invalid = done.invalid,
        resyncs = done.resyncs,
        "ingest.stopped"
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_labels(args: LabelsArgs, shutdown: &CancellationToken) -> anyhow::Result<ExitCode> {
    let Network {
        http,
        resolver: identity,
        ..
    } = network(&args.common)?;
    let redis = atpdb_fleet::connect(&args.common.redis_url)
        .await
        .with_context(|| format!("connecting to {}", args.common.redis_url))?;
    let labelers = args
        .labelers
        .iter()
        .map(|did| did.trim())
        .filter(|did| !did.is_empty())
        .map(|did| {
            did.parse()
                .with_context(|| format!("labeler {did:?} is not a DID"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = LabelsConfig {
        labelers,
        stream: args.stream,
        high_water: args.high_water_mark.max(1),
        ..LabelsConfig::default()
    };
    let done = supervise("labels", shutdown, || {
        let (http, identity, redis, config) = (
            http.clone(),
            identity.clone(),
            redis.clone(),
            config.clone(),
        );
        async move { labels::run(&http, identity, redis, &config, shutdown).await }
    })
    .await?;
    tracing::info!(
        labels = done.labels,
        invalid = done.invalid,
        replayed = done.replayed,
        "labels.stopped"
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_index(args: IndexArgs, shutdown: &CancellationToken) -> anyhow::Result<ExitCode> {
    let redis = atpdb_fleet::connect(&args.common.redis_url)
        .await
        .with_context(|| format!("connecting to {}", args.common.redis_url))?;
    // Fails now (not in the supervisor's loop) when the URL or the server is wrong.
    drop(
        atpdb_fleet::index::connect(&args.database_url)
            .await
            .context("connecting to PostgreSQL (DATABASE_URL)")?,
    );
    let config = IndexConfig {
        streams: args
            .streams
            .into_iter()
            .filter(|stream| !stream.trim().is_empty())
            .collect(),
        group: args.group,
        consumer: args.consumer,
        batch_size: args.batch_size.max(1),
        exit_when_idle: args.exit_when_idle_secs.map(Duration::from_secs),
        claim_idle: Duration::from_secs(args.claim_idle_secs.max(1)),
        delete_acked: !args.keep_acked,
    };
    tracing::info!(
        streams = ?config.streams,
        consumer = %config.consumer,
        concurrency = args.concurrency.max(1),
        "index.start"
    );
    let url = args.database_url;
    // One failing for good stops the others: the process exits non-zero, never half-running.
    let stop = shutdown.child_token();
    let mut indexers = tokio::task::JoinSet::new();
    for number in 1..=args.concurrency.max(1) {
        let config = IndexConfig {
            consumer: match number {
                1 => config.consumer.clone(),
                _ => format!("{}.{number}", config.consumer),
            },
            ..config.clone()
        };
        let (redis, url, stop) = (redis.clone(), url.clone(), stop.clone());
        indexers.spawn(async move {
            let done = supervise("index", &stop, || {
                let (redis, config, url, stop) =
                    (redis.clone(), config.clone(), url.clone(), stop.clone());
                async move {
                    let mut postgres = atpdb_fleet::index::connect(&url).await?;
                    index::run(redis, &mut postgres, &config, &stop).await
                }
            })
            .await;
            if done.is_err() {
                stop.cancel();
            }
            done
        });
    }
    let mut done = atpdb_fleet::index::Indexed::default();
    let mut failed = None;
    while let Some(finished) = indexers.join_next().await {
        match finished? {
            Ok(one) => {
                done.entries += one.entries;
                done.records += one.records;
                done.unreadable += one.unreadable;
                done.claimed += one.claimed;
            }
            Err(err) => {
                failed.get_or_insert(err);
            }
        }
    }
    tracing::info!(
        entries = done.entries,
        records = done.records,
        unreadable = done.unreadable,
        claimed = done.claimed,
        "index.stopped"
    );
    match failed {
        Some(err) => Err(err),
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn run_status(args: StatusArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let redis = atpdb_fleet::connect(&args.common.redis_url)
        .await
        .with_context(|| format!("connecting to {}", args.common.redis_url))?;
    let postgres = match &args.database_url {
        Some(url) => Some(
            atpdb_fleet::index::connect(url)
                .await
                .context("connecting to PostgreSQL (DATABASE_URL)")?,
        ),
        None => None,
    };
    let streams: Vec<String> = args
        .streams
        .into_iter()
        .filter(|stream| !stream.trim().is_empty())
        .collect();
    let config = StatusConfig {
        cursor_patterns: streams
            .iter()
            .map(|stream| format!("{stream}:cursor:*"))
            .collect(),
        streams,
        error_streams: args
            .error_streams
            .into_iter()
            .filter(|stream| !stream.trim().is_empty())
            .collect(),
    };
    let Some(listen) = args.listen else {
        let mut redis = redis;
        let found = status::collect(&mut redis, postgres.as_ref(), &config).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&found)?);
        } else {
            print!("{}", found.to_text());
        }
        return Ok(ExitCode::SUCCESS);
    };
    let state = std::sync::Arc::new((redis, postgres, config));
    let app =
        axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(
                    |axum::extract::State(state): axum::extract::State<
                        std::sync::Arc<StatusState>,
                    >| async move {
                        let (redis, postgres, config) = &*state;
                        let mut redis = redis.clone();
                        match status::collect(&mut redis, postgres.as_ref(), config).await {
                            Ok(found) => (
                                axum::http::StatusCode::OK,
                                [("content-type", "text/plain; version=0.0.4")],
                                found.to_prometheus(),
                            ),
                            Err(err) => (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                [("content-type", "text/plain; charset=utf-8")],
                                format!("{err}\n"),
                            ),
                        }
                    },
                ),
            )
            .with_state(state);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, "status.listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(ExitCode::SUCCESS)
}

type StatusState = (
    atpdb_fleet::ConnectionManager,
    Option<atpdb_fleet::tokio_postgres::Client>,
    StatusConfig,
);
