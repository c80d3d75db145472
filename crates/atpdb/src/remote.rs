//! The commands that talk to a running server: `atpdb repos|config|query` and the REPL's
//! dot-commands. One client and one rendering of each answer, so that the CLI and the REPL
//! say the same things, and both say what the server refused and why.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Where the server is, and how to print its answers.
#[derive(Debug, Clone, Args)]
pub(crate) struct Connection {
    /// The running server's URL.
    #[arg(
        long,
        env = "ATPDB_URL",
        default_value = "http://127.0.0.1:2480",
        global = true
    )]
    url: String,
    /// Its admin password, when it has one [TAP_ADMIN_PASSWORD].
    #[arg(
        long,
        env = "ATPDB_ADMIN_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    password: Option<String>,
    /// Print the server's JSON answer instead of text.
    #[arg(long, global = true)]
    json: bool,
}

impl Connection {
    fn remote(&self) -> anyhow::Result<Remote> {
        let password = self.password.clone().or_else(|| {
            std::env::var("TAP_ADMIN_PASSWORD")
                .ok()
                .filter(|value| !value.is_empty())
        });
        Remote::new(&self.url, password)
    }
}

/// `atpdb repos …`: the tracked repos of a running server.
#[derive(Debug, Subcommand)]
pub(crate) enum ReposCommand {
    /// Track these repos: each is backfilled, then followed live.
    Add {
        #[arg(required = true)]
        dids: Vec<String>,
    },
    /// Stop tracking these repos and forget their records.
    Remove {
        #[arg(required = true)]
        dids: Vec<String>,
    },
    /// Tracked repos in DID order, a page at a time.
    List {
        /// Only repos in this state (pending, resyncing, active, desynchronized, error).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this DID (the last line of the previous page says it).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Everything known about one repo.
    Status { did: String },
    /// Repos whose last sync failed, with the reason.
    Errors,
    /// Fetch these repos again (or every errored one with --errors).
    Resync {
        dids: Vec<String>,
        #[arg(long)]
        errors: bool,
    },
}

/// `atpdb config …`: the running engine's scope.
#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// The scope and settings the engine runs with.
    Get,
    /// Change the scope; one that keeps more records resyncs the synced repos.
    Set(ConfigChange),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true)))]
pub(crate) struct ConfigChange {
    /// manual, signal or full.
    #[arg(long, group = "change")]
    mode: Option<String>,
    /// Track repos that write these collections (comma-separated; sets mode signal).
    #[arg(long, group = "change")]
    signal_collections: Option<String>,
    /// Keep only these collections (comma-separated; `*` for all).
    #[arg(long, group = "change")]
    collection_filters: Option<String>,
}

impl ConfigChange {
    fn body(&self) -> Value {
        let mut body = serde_json::Map::new();
        if let Some(signals) = &self.signal_collections {
            body.insert("mode".into(), "signal".into());
            body.insert("signal_collections".into(), signals.as_str().into());
        }
        if let Some(mode) = &self.mode {
            body.insert("mode".into(), mode.as_str().into());
        }
        if let Some(filters) = &self.collection_filters {
            body.insert("collection_filters".into(), filters.as_str().into());
        }
        Value::Object(body)
    }
}

/// `atpdb query AT-URI`.
#[derive(Debug, Args)]
pub(crate) struct QueryArgs {
    /// `at://did/collection/rkey`, `at://did/collection/*` or `at://*/collection/*`.
    uri: String,
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Continue from the cursor a previous page printed.
    #[arg(long)]
    cursor: Option<String>,
}

pub(crate) fn run_repos(connection: &Connection, command: ReposCommand) -> anyhow::Result<()> {
    let remote = connection.remote()?;
    let reply = block_on(async {
        match command {
            ReposCommand::Add { dids } => remote.repos_add(&dids).await,
            ReposCommand::Remove { dids } => remote.repos_remove(&dids).await,
            ReposCommand::List {
                state,
                limit,
                cursor,
            } => {
                remote
                    .repos_list(state.as_deref(), limit, cursor.as_deref())
                    .await
            }
            ReposCommand::Status { did } => remote.repo_status(&did).await,
            ReposCommand::Errors => remote.repo_errors().await,
            ReposCommand::Resync { dids, errors } => remote.resync(&dids, errors).await,
        }
    })?;
    reply.print(connection.json)
}

pub(crate) fn run_config(connection: &Connection, command: ConfigCommand) -> anyhow::Result<()> {
    let remote = connection.remote()?;
    let reply = block_on(async {
        match command {
            ConfigCommand::Get => remote.config().await,
            ConfigCommand::Set(change) => remote.set_config(change.body()).await,
        }
    })?;
    reply.print(connection.json)
}

pub(crate) fn run_query(connection: &Connection, args: QueryArgs) -> anyhow::Result<()> {
    let remote = connection.remote()?;
    let reply = block_on(async {
        remote
            .query(&args.uri, args.limit, args.cursor.as_deref())
            .await
    })?;
    reply.print(connection.json)
}

fn block_on<T>(work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(work)
}

/// An answer: the server's JSON, and the text a person reads.
pub(crate) struct Reply {
    json: Value,
    text: String,
}

impl Reply {
    fn new(json: Value, text: String) -> Reply {
        Reply { json, text }
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    fn print(&self, as_json: bool) -> anyhow::Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if as_json {
            serde_json::to_writer_pretty(&mut out, &self.json)?;
            writeln!(out)?;
        } else if !self.text.is_empty() {
            writeln!(out, "{}", self.text.trim_end())?;
        }
        Ok(())
    }
}

/// A running atpdb server's HTTP API.
#[derive(Debug, Clone)]
pub(crate) struct Remote {
    http: reqwest::Client,
    url: String,
    password: Option<String>,
}

impl Remote {
    pub(crate) fn new(url: &str, password: Option<String>) -> anyhow::Result<Remote> {
        let url = url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&url).with_context(|| format!("--url {url:?}"))?;
        anyhow::ensure!(
            matches!(parsed.scheme(), "http" | "https"),
            "--url {url:?}: an atpdb server's URL starts with http:// or https://"
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(Remote {
            http,
            url,
            password,
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .query(query);
        if let Some(password) = &self.password {
            request = request.basic_auth("admin", Some(password));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("no answer from {}", self.url))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {}", self.url))?;
        if !status.is_success() {
            let said = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|value| {
                    ["message", "error"]
                        .iter()
                        .find_map(|key| value.get(key).and_then(Value::as_str).map(str::to_owned))
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect());
            anyhow::bail!("the server refused ({status}): {said}");
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).with_context(|| format!("{path}: the answer is not JSON"))
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, query, None).await
    }

    pub(crate) async fn repos_add(&self, dids: &[String]) -> anyhow::Result<Reply> {
        let json = self
            .call(
                reqwest::Method::POST,
                "/repos/add",
                &[],
                Some(json!({ "dids": dids })),
            )
            .await?;
        Ok(Reply::new(
            json,
            format!("added {}; they backfill now", plural(dids.len(), "repo")),
        ))
    }

    pub(crate) async fn repos_remove(&self, dids: &[String]) -> anyhow::Result<Reply> {
        let json = self
            .call(
                reqwest::Method::POST,
                "/repos/remove",
                &[],
                Some(json!({ "dids": dids })),
            )
            .await?;
        Ok(Reply::new(
            json,
            format!("removed {}", plural(dids.len(), "repo")),
        ))
    }

    pub(crate) async fn repos_list(
        &self,
        state: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let limit = limit.to_string();
        let mut query = vec![("limit", limit.as_str())];
        query.extend(state.map(|state| ("state", state)));
        query.extend(cursor.map(|cursor| ("cursor", cursor)));
        let json = self.get("/repos", &query).await?;
        let mut text = String::new();
        for repo in items(&json, "repos") {
            text.push_str(&format!(
                "{:<34} {:<14} {:<12} {:<14} {}\n",
                field(repo, "did"),
                field(repo, "state"),
                field(repo, "status"),
                field(repo, "rev"),
                field(repo, "handle"),
            ));
        }
        if text.is_empty() {
            text.push_str("no repos\n");
        }
        if let Some(next) = json.get("cursor").and_then(Value::as_str) {
            text.push_str(&format!("more: --cursor {next}\n"));
        }
        Ok(Reply::new(json, text))
    }

    /// Only the DIDs of [`Remote::repos_list`].
    pub(crate) async fn dids(&self, state: Option<&str>, limit: usize) -> anyhow::Result<Reply> {
        let limit = limit.to_string();
        let mut query = vec![("limit", limit.as_str())];
        query.extend(state.map(|state| ("state", state)));
        let json = self.get("/repos", &query).await?;
        let mut text: String = items(&json, "repos")
            .map(|repo| format!("{}\n", field(repo, "did")))
            .collect();
        if text.is_empty() {
            text.push_str("no repos\n");
        }
        if json.get("cursor").is_some() {
            text.push_str("… (first page; `atpdb repos list` pages through the rest)\n");
        }
        Ok(Reply::new(json, text))
    }

    pub(crate) async fn repo_status(&self, did: &str) -> anyhow::Result<Reply> {
        let json = self
            .get(&format!("/repos/{}", path_segment(did)), &[])
            .await?;
        let mut text = String::new();
        for key in [
            "did", "handle", "state", "status", "rev", "records", "pds", "retries", "error",
        ] {
            let value = field(&json, key);
            if !value.is_empty() {
                text.push_str(&format!("{key:<12}{value}\n"));
            }
        }
        let collections: Vec<String> = items(&json, "collections")
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        text.push_str(&format!("{:<12}{}\n", "collections", collections.join(" ")));
        Ok(Reply::new(json, text))
    }

    pub(crate) async fn collections(&self, did: &str) -> anyhow::Result<Reply> {
        let json = self
            .get(&format!("/repos/{}", path_segment(did)), &[])
            .await?;
        let mut text: String = items(&json, "collections")
            .filter_map(Value::as_str)
            .map(|collection| format!("{collection}\n"))
            .collect();
        if text.is_empty() {
            text.push_str("no records\n");
        }
        Ok(Reply::new(json, text))
    }

    pub(crate) async fn repo_errors(&self) -> anyhow::Result<Reply> {
        let json = self.get("/repos/errors", &[]).await?;
        let mut text: String = items(&json, "repos")
            .map(|repo| {
                format!(
                    "{:<34} retries {:<3} {}\n",
                    field(repo, "did"),
                    field(repo, "retries"),
                    field(repo, "error")
                )
            })
            .collect();
        if text.is_empty() {
            text.push_str("no repos in error\n");
        }
        Ok(Reply::new(json, text))
    }

    pub(crate) async fn resync(&self, dids: &[String], errors: bool) -> anyhow::Result<Reply> {
        anyhow::ensure!(
            errors || !dids.is_empty(),
            "name the repos to resync, or --errors for every errored one"
        );
        let json = self
            .call(
                reqwest::Method::POST,
                "/repos/resync",
                &[],
                Some(json!({ "dids": dids, "errors": errors })),
            )
            .await?;
        let count = json.get("resyncing").and_then(Value::as_u64).unwrap_or(0);
        Ok(Reply::new(
            json,
            format!("resyncing {}", plural(count as usize, "repo")),
        ))
    }

    pub(crate) async fn config(&self) -> anyhow::Result<Reply> {
        let json = self.get("/config", &[]).await?;
        let text = config_text(&json);
        Ok(Reply::new(json, text))
    }

    pub(crate) async fn set_config(&self, change: Value) -> anyhow::Result<Reply> {
        let json = self
            .call(reqwest::Method::PUT, "/config", &[], Some(change))
            .await?;
        let mut text = config_text(&json);
        if let Some(count) = json.get("resyncing").and_then(Value::as_u64) {
            text.push_str(&format!(
                "resyncing {} for the wider scope\n",
                plural(count as usize, "repo")
            ));
        }
        Ok(Reply::new(json, text))
    }

    pub(crate) async fn query(
        &self,
        uri: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let limit = limit.to_string();
        let mut query = vec![("uri", uri), ("limit", limit.as_str())];
        query.extend(cursor.map(|cursor| ("cursor", cursor)));
        let json = self.get("/query", &query).await?;
        let mut text = String::new();
        // One record, or a page of them.
        let records = if json.get("uri").is_some() {
            std::slice::from_ref(&json)
        } else {
            json.get("records")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice)
        };
        for record in records {
            text.push_str(&format!(
                "{}  {}\n  {}\n",
                field(record, "uri"),
                field(record, "cid"),
                record.get("value").unwrap_or(&Value::Null)
            ));
        }
        if text.is_empty() {
            text.push_str("no records\n");
        }
        if let Some(next) = json.get("cursor").and_then(Value::as_str) {
            text.push_str(&format!("more: --cursor {next}\n"));
        }
        Ok(Reply::new(json, text))
    }

    /// The numbers of the status page.
    pub(crate) async fn stats(&self) -> anyhow::Result<Reply> {
        let json = self.get("/status.json", &[]).await?;
        let mut text = String::new();
        if let Some(repos) = json.get("repos").and_then(Value::as_object) {
            let states: Vec<String> = repos
                .iter()
                .map(|(state, count)| format!("{state} {count}"))
                .collect();
            text.push_str(&format!("repos       {}\n", states.join(" · ")));
        }
        let number = |pointer: &str| {
            json.pointer(pointer)
                .map(|value| value.to_string())
                .unwrap_or_default()
        };
        text.push_str(&format!("records     {}\n", number("/records")));
        text.push_str(&format!(
            "events      {} written · {} in the outbox · {} buffered for resyncs\n",
            number("/last_event_id"),
            number("/outbox"),
            number("/resync_buffer")
        ));
        text.push_str(&format!(
            "firehose    cursor {} · {} events in · {} commits applied · {} invalid\n",
            number("/firehose/cursor"),
            number("/firehose/events_in"),
            number("/firehose/commits_applied"),
            number("/firehose/commits_invalid")
        ));
        text.push_str(&format!(
            "delivery    {} · {} sent · {} acked · {} consumers\n",
            json.pointer("/delivery/mode")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            number("/delivery/sent"),
            number("/delivery/acked"),
            number("/delivery/consumers")
        ));
        Ok(Reply::new(json, text))
    }
}

fn config_text(json: &Value) -> String {
    let list = |key: &str| {
        let names: Vec<&str> = items(json, key).filter_map(Value::as_str).collect();
        if names.is_empty() {
            "-".to_owned()
        } else {
            names.join(",")
        }
    };
    let mut text = format!(
        "mode                {}\nsignal collections  {}\ncollection filters  {}\n",
        field(json, "mode"),
        list("signal_collections"),
        list("collection_filters"),
    );
    for key in [
        "relay_url",
        "resync_parallelism",
        "firehose_parallelism",
        "follow_firehose",
        "delivery",
    ] {
        text.push_str(&format!(
            "{:<20}{}\n",
            key.replace('_', " "),
            field(json, key)
        ));
    }
    text
}

/// A field as text: strings bare, other values as JSON, absent as empty.
fn field(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

fn items<'a>(value: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    value
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// A DID as one URL path segment: its `:` are fine, but a `/`, `?` or `#` typed by mistake
/// must reach the server (and its clear refusal) rather than change the route.
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b":._-~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
