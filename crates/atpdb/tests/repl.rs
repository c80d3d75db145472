//! `atpdb repl` as a person uses it: on a pseudo-terminal (so line editing and history are
//! live), syncing a devnet with the seed's dot-commands and at:// queries, then checked
//! against the devnet's own repos and the API.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atpdb_devnet::{Devnet, DevnetConfig};
use serde_json::Value as Json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A child process on the slave side of a pseudo-terminal; what it writes collects in
/// `screen`.
struct Terminal {
    child: Child,
    input: std::fs::File,
    screen: Arc<Mutex<Vec<u8>>>,
    /// How much of `screen` earlier steps consumed.
    seen: usize,
}

impl Terminal {
    fn spawn(mut command: Command) -> Result<Terminal, Box<dyn std::error::Error>> {
        let size = nix::pty::Winsize {
            ws_row: 50,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(&size, None)?;
        let child = command
            .stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave))
            .spawn()?;
        let master = std::fs::File::from(pty.master);
        let input = master.try_clone()?;
        let screen = Arc::new(Mutex::new(Vec::new()));
        let collected = screen.clone();
        std::thread::spawn(move || {
            let mut master = master;
            let mut buffer = [0u8; 4096];
            // Reading ends with EIO once the child and every copy of the slave are gone.
            while let Ok(read @ 1..) = master.read(&mut buffer) {
                if let Ok(mut screen) = collected.lock() {
                    screen.extend_from_slice(&buffer[..read]);
                }
            }
        });
        // `command` (and with it our copies of the slave) is dropped here.
        Ok(Terminal {
            child,
            input,
            screen,
            seen: 0,
        })
    }

    fn text(&self) -> String {
        let screen = self.screen.lock().map(|s| s.clone()).unwrap_or_default();
        String::from_utf8_lossy(&screen[self.seen.min(screen.len())..]).into_owned()
    }

    /// Waits for `needle`, then for the prompt after it; returns what appeared since the
    /// last step.
    fn expect(&mut self, needle: &str) -> Result<String, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.text();
            if let Some(at) = text.find(needle)
                && let Some(prompt) = text[at + needle.len()..].find("atp> ")
            {
                let end = at + needle.len() + prompt + "atp> ".len();
                self.seen += text[..end].len();
                return Ok(text[..end].to_owned());
            }
            if Instant::now() > deadline {
                return Err(format!("no {needle:?} then a prompt on the screen:\n{text}").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types a line and waits for `needle` in the answer.
    fn run(&mut self, line: &str, needle: &str) -> Result<String, Box<dyn std::error::Error>> {
        self.input.write_all(line.as_bytes())?;
        self.input.write_all(b"\r")?;
        self.input.flush()?;
        self.expect(needle)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The seed's REPL session: connect, add repos, watch them sync, inspect, query, change the
/// scope, resync, remove, disconnect, and leave; bad input gets a message, not an exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repl_syncs_a_devnet_through_the_seeds_commands() -> TestResult {
    let devnet = Devnet::start(DevnetConfig {
        pds_hosts: 1,
        accounts: 3,
        records: 12,
        ..DevnetConfig::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let relay = devnet.relay().ok_or("no relay")?.url().to_owned();
    let dids: Vec<String> = devnet
        .accounts()
        .iter()
        .map(|account| account.did.to_string())
        .collect();
    let data = dir.path().join("data");
    let mut command = Command::new(env!("CARGO_BIN_EXE_atpdb"));
    command
        .args(["repl", "--data-dir", &data.display().to_string()])
        .args(["--plc-url", devnet.plc_url(), "--allow-private-network"])
        .args(["--dns-nameserver", &devnet.dns_addr().to_string()])
        .args(["--min-backoff-secs", "1", "--max-backoff-secs", "2"])
        .env("HOME", dir.path())
        .env("TERM", "xterm")
        .env_remove("ATPDB_URL");
    let mut repl = tokio::task::block_in_place(|| Terminal::spawn(command))?;

    let http = reqwest::Client::new();
    let (did0, did1, did2) = (&dids[0], &dids[1], &dids[2]);
    let url = tokio::task::block_in_place(|| -> Result<String, Box<dyn std::error::Error>> {
        repl.expect(".help lists the commands")?;
        let help = repl.run(".help", ".quit")?;
        assert!(help.contains(".connect [relay]") && help.contains("at://*/COLLECTION/*"));
        // Nothing to talk to yet: a clear message, and the shell stays.
        repl.run(".stats", "not connected")?;
        repl.run(".frobnicate", "unknown command")?;
        let connected = repl.run(&format!(".connect {relay}"), "status page at ")?;
        let url = connected
            .split("status page at ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or("no URL after .connect")?
            .to_owned();
        assert!(connected.contains(&relay), "{connected}");
        repl.run(".connect", "already syncing here")?;
        repl.run(".repos add did:nope", "invalid DID")?;
        repl.run(&format!(".repos add {did0} {did1} {did2}"), "added 3 repos")?;
        Ok(url)
    })?;
    // The embedded engine's API is the one the shell reads: wait for the sync there.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let synced: Json = http
            .get(format!("{url}/repos?state=active"))
            .send()
            .await?
            .json()
            .await?;
        if synced["repos"].as_array().map_or(0, Vec::len) == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "not synced: {synced}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let records = devnet.hosts()[0].account_records(&devnet.accounts()[0].did)?;
    let (path, cid) = records.first().ok_or("an account without records")?;
    let (collection, rkey) = path.split_once('/').ok_or("a path without /")?;
    let in_collection = records
        .iter()
        .filter(|(p, _)| p.starts_with(&format!("{collection}/")))
        .count();

    tokio::task::block_in_place(|| -> TestResult {
        let stats = repl.run(".stats", "delivery")?;
        assert!(stats.contains("active 3"), "{stats}");
        assert!(
            stats.contains(&format!("records     {}", total(&devnet)?)),
            "{stats}"
        );
        let listed = repl.run(".dids", did2)?;
        assert!(listed.contains(did0.as_str()) && listed.contains(did1.as_str()));
        repl.run(&format!(".collections {did0}"), collection)?;
        let status = repl.run(&format!(".repos status {did0}"), "collections")?;
        assert!(
            status.contains(&format!("records     {}", records.len())),
            "{status}"
        );
        repl.run(".repos errors", "no repos in error")?;
        let list = repl.run(".repos list active", did2)?;
        assert!(list.contains("active"), "{list}");

        // The at:// patterns: one record, a repo's collection, a collection everywhere.
        let one = repl.run(
            &format!("at://{did0}/{collection}/{rkey}"),
            &cid.to_string(),
        )?;
        assert!(one.contains("\"$type\""), "{one}");
        let listing = repl.run(&format!("at://{did0}/{collection}/*"), "$type")?;
        // Each record's URI, not the typed pattern's echo.
        let prefix = format!("at://{did0}/{collection}/");
        let uris = listing
            .match_indices(&prefix)
            .filter(|(at, _)| !listing[at + prefix.len()..].starts_with('*'))
            .count();
        assert_eq!(uris, in_collection, "{listing}");
        let everywhere = repl.run(&format!("at://*/{collection}/*"), "$type")?;
        assert!(everywhere.contains(did2.as_str()), "{everywhere}");
        repl.run(
            &format!("at://{did0}/{collection}/nope"),
            "record not found",
        )?;

        let config = repl.run(".config", "delivery")?;
        assert!(config.contains("mode                manual"), "{config}");
        repl.run(".config mode sometimes", "is not one of")?;
        let narrowed = repl.run(&format!(".config collections {collection}"), "delivery")?;
        assert!(
            narrowed.contains(&format!("collection filters  {collection}")),
            "{narrowed}"
        );
        repl.run(".config collections *", "resyncing")?;
        repl.run(&format!(".repos resync {did1}"), "resyncing 1 repo")?;
        repl.run(".repos resync --errors", "resyncing 0 repos")?;
        repl.run(&format!(".repos remove {did2}"), "removed 1 repo")?;
        repl.run(".disconnect", "stopped syncing")?;
        repl.run(".stats", "not connected")?;
        repl.input.write_all(b".quit\r")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = repl.child.try_wait()? {
                break status;
            }
            assert!(Instant::now() < deadline, "the REPL did not quit");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{status}");
        Ok(())
    })?;

    // History survives the session.
    let history = std::fs::read_to_string(dir.path().join(".atpdb_history"))?;
    assert!(history.contains(".repos add did:nope") && history.contains(".quit"));
    // The mirror it left behind is the devnet's, less the removed repo.
    let store = atpdb_store::Store::open(&data)?;
    let mut tracked: Vec<String> = store
        .repos(None, 10)?
        .into_iter()
        .map(|entry| entry.did.to_string())
        .collect();
    tracked.sort();
    let mut expected = vec![did0.clone(), did1.clone()];
    expected.sort();
    assert_eq!(tracked, expected);
    Ok(())
}

fn total(devnet: &Devnet) -> Result<usize, Box<dyn std::error::Error>> {
    let mut total = 0;
    for account in devnet.accounts() {
        total += devnet.hosts()[account.pds]
            .account_records(&account.did)?
            .len();
    }
    Ok(total)
}
