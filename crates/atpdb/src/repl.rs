//! `atpdb repl`: an interactive shell (`atp>`) over a mirror. `.connect [relay]` starts the
//! engine and its API in this process, on the data directory, following the relay; `--url`
//! attaches to a server running elsewhere instead. Every command then goes through the same
//! HTTP API and renderings as `atpdb repos|config|query`, so the shell can do nothing the
//! API cannot and says nothing the CLI would say differently.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use atpdb_sync::Engine;
use clap::Args;
use rustyline::error::ReadlineError;

use crate::remote::{Remote, Reply};
use crate::serve::ServeArgs;

/// Options of `atpdb repl`: serve's, for the engine `.connect` starts.
#[derive(Debug, Args)]
pub(crate) struct ReplArgs {
    /// Attach to the atpdb server at this URL instead of running an engine here.
    #[arg(long, env = "ATPDB_URL")]
    url: Option<String>,
    /// Command history (default: ~/.atpdb_history).
    #[arg(long, env = "ATPDB_HISTORY")]
    history: Option<PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
}

const HELP: &str = "\
.connect [relay]            sync here: start the engine on the data directory, following the relay
.disconnect                 stop syncing (the mirror stays on disk)
.stats                      repos by state, records, events, firehose, delivery
.dids [state]               tracked DIDs (state: pending, resyncing, active, desynchronized, error)
.collections DID            the collections a repo has records in
.repos add DID...           track repos (backfilled, then followed live)
.repos remove DID...        stop tracking repos
.repos list [state]         tracked repos with their state and rev
.repos status DID           everything known about one repo
.repos errors               repos whose last sync failed, and why
.repos resync [--errors] [DID...]
                            fetch repos again (--errors: every errored one)
.config                     the scope and settings
.config mode manual|signal|full
.config signal NSID,...     track repos that write these collections
.config collections NSID,...
                            keep only these collections (`*`: all)
at://DID/COLLECTION/RKEY    one record
at://DID/COLLECTION/*       a repo's records of a collection
at://*/COLLECTION/*         a collection across every tracked repo
.help                       this list
.quit                       leave (Ctrl-D too)";

pub(crate) fn run(args: ReplArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut editor = rustyline::DefaultEditor::new().context("opening the terminal")?;
    let history = args.history.clone().or_else(|| {
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".atpdb_history"))
    });
    if let Some(path) = &history {
        // A first run has no history yet.
        let _ = editor.load_history(path);
    }
    let mut shell = Shell {
        runtime,
        password: args.serve.admin_password(),
        serve: args.serve,
        remote: None,
        embedded: None,
        logging: false,
    };
    println!(
        "atpdb {} — .help lists the commands",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(url) = &args.url {
        match shell.attach(url) {
            Ok(said) => println!("{said}"),
            Err(err) => println!("error: {err:#}"),
        }
    }
    loop {
        match editor.readline("atp> ") {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let _ = editor.add_history_entry(line);
                if let Some(path) = &history
                    && let Err(err) = editor.save_history(path)
                {
                    println!("warning: history not saved to {}: {err}", path.display());
                }
                match shell.execute(line) {
                    Ok(Step::Continue(text)) => {
                        if !text.is_empty() {
                            println!("{}", text.trim_end());
                        }
                    }
                    Ok(Step::Quit) => break,
                    Err(err) => println!("error: {err:#}"),
                }
            }
            Err(ReadlineError::Interrupted) => println!("(.quit or Ctrl-D to leave)"),
            Err(ReadlineError::Eof) => break,
            Err(err) => return Err(err).context("reading a command"),
        }
    }
    shell.disconnect()?;
    Ok(ExitCode::SUCCESS)
}

enum Step {
    Continue(String),
    Quit,
}

/// An engine `.connect` started in this process.
struct Embedded {
    engine: Engine,
    task: tokio::task::JoinHandle<anyhow::Result<ExitCode>>,
}

struct Shell {
    runtime: tokio::runtime::Runtime,
    serve: ServeArgs,
    password: Option<String>,
    remote: Option<Remote>,
    embedded: Option<Embedded>,
    logging: bool,
}

impl Shell {
    fn execute(&mut self, line: &str) -> anyhow::Result<Step> {
        if line.starts_with("at://") {
            let remote = self.remote()?;
            return self.answer(remote.query(line, 20, None));
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let (command, rest) = words.split_first().map_or(("", &[][..]), |(c, r)| (*c, r));
        match command {
            ".help" => Ok(Step::Continue(HELP.to_owned())),
            ".quit" | ".exit" => Ok(Step::Quit),
            ".connect" => match rest {
                [] => self.connect(None).map(Step::Continue),
                [relay] => self.connect(Some(relay)).map(Step::Continue),
                _ => anyhow::bail!("usage: .connect [relay]"),
            },
            ".disconnect" => self.disconnect().map(Step::Continue),
            ".stats" => {
                let remote = self.remote()?;
                self.answer(remote.stats())
            }
            ".dids" => {
                let remote = self.remote()?;
                match rest {
                    [] => self.answer(remote.dids(None, 1000)),
                    [state] => self.answer(remote.dids(Some(state), 1000)),
                    _ => anyhow::bail!("usage: .dids [state]"),
                }
            }
            ".collections" => {
                let [did] = rest else {
                    anyhow::bail!("usage: .collections DID");
                };
                let remote = self.remote()?;
                self.answer(remote.collections(did))
            }
            ".repos" => self.repos(rest),
            ".config" => self.config(rest),
            other => anyhow::bail!("unknown command {other:?}: .help lists them"),
        }
    }

    fn repos(&mut self, words: &[&str]) -> anyhow::Result<Step> {
        let remote = self.remote()?;
        let owned = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        match words {
            ["add", dids @ ..] if !dids.is_empty() => self.answer(remote.repos_add(&owned(dids))),
            ["remove", dids @ ..] if !dids.is_empty() => {
                self.answer(remote.repos_remove(&owned(dids)))
            }
            ["list"] => self.answer(remote.repos_list(None, 100, None)),
            ["list", state] => self.answer(remote.repos_list(Some(state), 100, None)),
            ["status", did] => self.answer(remote.repo_status(did)),
            ["errors"] => self.answer(remote.repo_errors()),
            ["resync", rest @ ..] => {
                let errors = rest.contains(&"--errors");
                let dids: Vec<String> = owned(rest)
                    .into_iter()
                    .filter(|word| word != "--errors")
                    .collect();
                self.answer(remote.resync(&dids, errors))
            }
            _ => anyhow::bail!(
                "usage: .repos add|remove DID... | list [state] | status DID | errors | resync [--errors] [DID...]"
            ),
        }
    }

    fn config(&mut self, words: &[&str]) -> anyhow::Result<Step> {
        let remote = self.remote()?;
        let change = match words {
            [] => return self.answer(remote.config()),
            ["mode", mode] => serde_json::json!({ "mode": mode }),
            ["signal", signals] => {
                serde_json::json!({ "mode": "signal", "signal_collections": signals })
            }
            ["collections", filters] => serde_json::json!({ "collection_filters": filters }),
            _ => anyhow::bail!(
                "usage: .config | .config mode manual|signal|full | .config signal NSID,... | .config collections NSID,..."
            ),
        };
        self.answer(remote.set_config(change))
    }

    fn answer(&self, call: impl Future<Output = anyhow::Result<Reply>>) -> anyhow::Result<Step> {
        let reply = self.runtime.block_on(call)?;
        Ok(Step::Continue(reply.text().to_owned()))
    }

    fn remote(&self) -> anyhow::Result<Remote> {
        self.remote.clone().ok_or_else(|| {
            anyhow::anyhow!("not connected: .connect [relay] syncs here (or start with --url)")
        })
    }

    /// Attaches to a server running elsewhere.
    fn attach(&mut self, url: &str) -> anyhow::Result<String> {
        let remote = Remote::new(url, self.password.clone())?;
        self.runtime
            .block_on(remote.config())
            .with_context(|| format!("attaching to {url}"))?;
        let said = format!("attached to {}", remote.url());
        self.remote = Some(remote);
        Ok(said)
    }

    fn connect(&mut self, relay: Option<&str>) -> anyhow::Result<String> {
        if self.embedded.is_some() {
            anyhow::bail!("already syncing here; .disconnect first");
        }
        if let Some(remote) = &self.remote {
            anyhow::bail!(
                "attached to {}, which follows its own relay (see .config)",
                remote.url()
            );
        }
        let args = self.serve.clone().embedded(relay.map(str::to_owned));
        if !self.logging {
            // The screen is the prompt's; the engine logs next to its data.
            let data_dir = args.data_dir().to_owned();
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            crate::logging::init_file(args.log_format(), &data_dir.join("atpdb.log"))?;
            self.logging = true;
        }
        let (ready, started) = tokio::sync::oneshot::channel();
        let task = self
            .runtime
            .spawn(crate::serve::serve_with(args, move |engine, url| {
                let _ = ready.send((engine.clone(), url.to_owned()));
            }));
        let Ok((engine, url)) = self.runtime.block_on(started) else {
            // It stopped before its API listened: say why.
            return Err(match self.runtime.block_on(task) {
                Ok(Err(err)) => err,
                Ok(Ok(_)) => anyhow::anyhow!("the engine stopped as it started"),
                Err(err) => anyhow::anyhow!("the engine panicked: {err}"),
            });
        };
        let relay = engine.config().relay_url.clone();
        self.remote = Some(Remote::new(&url, self.password.clone())?);
        self.embedded = Some(Embedded { engine, task });
        Ok(format!(
            "syncing from {relay} into {}; API and status page at {url}",
            self.serve.data_dir().display()
        ))
    }

    fn disconnect(&mut self) -> anyhow::Result<String> {
        let Some(remote) = self.remote.take() else {
            return Ok("not connected".to_owned());
        };
        let Some(embedded) = self.embedded.take() else {
            return Ok(format!("detached from {}", remote.url()));
        };
        embedded.engine.shutdown();
        let ended = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), embedded.task).await })
            .context("the engine did not stop within 60 s")?;
        match ended {
            Ok(result) => {
                result?;
            }
            Err(err) => anyhow::bail!("the engine panicked: {err}"),
        }
        Ok(format!(
            "stopped syncing; the mirror stays in {}",
            self.serve.data_dir().display()
        ))
    }
}
