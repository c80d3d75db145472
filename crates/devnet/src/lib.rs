//! A whole AT Protocol network on loopback: a PLC directory, PDS hosts and a relay that speak
//! the real protocol byte for byte, with scripted traffic and injected faults.
//!
//! Every test and benchmark of atpdb runs against it, because no machine here reaches the real
//! network and a sync engine cannot be tested by waiting for the real one to misbehave.
//!
//! # Overview
//!
//! [`Devnet::start`] binds every server on 127.0.0.1, port 0, and seeds the accounts:
//!
//! - [`plc`]: the PLC directory, the DID documents of every account.
//! - [`pds`]: PDS hosts: accounts, repos, the sync and write XRPC surface, the firehose,
//!   `/.well-known/atproto-did` and an admin API.
//! - [`relay`]: a relay that crawls the hosts and serves one merged firehose.
//! - [`labeler`]: a labeler host with signed labels, `subscribeLabels` and `queryLabels`.
//! - `dns`: an authoritative DNS server answering `TXT _atproto.<handle>` with `did=<did>`
//!   for every handle a host holds now ([`Devnet::dns_addr`]), so handles verify both ways.
//! - [`traffic`]: seeded accounts and a background writer.
//! - [`faults`]: errors, delays and broken frames injected per server at runtime.
//!
//! ```no_run
//! # async fn demo() -> Result<(), atpdb_devnet::DevnetError> {
//! let devnet = atpdb_devnet::Devnet::start(atpdb_devnet::DevnetConfig {
//!     accounts: 10,
//!     records: 20,
//!     ..Default::default()
//! })
//! .await?;
//! println!("{}", devnet.ready_info());
//! # Ok(()) }
//! ```

mod auth;
mod dns;
pub mod faults;
pub mod labeler;
pub mod pds;
pub mod plc;
pub mod relay;
mod sequencer;
mod subscribe;
pub mod traffic;
mod xrpc;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::faults::{FaultSet, Faults, FaultyListener};
use crate::labeler::Labeler;
use crate::pds::{Pds, PdsConfig, PdsError};
use crate::plc::Plc;
use crate::relay::{Relay, RelayConfig};
use crate::traffic::{SeededAccount, TrafficStats};

/// What to start.
#[derive(Debug, Clone)]
pub struct DevnetConfig {
    /// PDS hosts, one port each.
    pub pds_hosts: usize,
    /// Accounts seeded across the hosts (round-robin).
    pub accounts: usize,
    /// Generated records per seeded account (plus a profile).
    pub records: usize,
    /// Commits per second written after seeding; 0 for none.
    pub rate: f64,
    /// Makes the traffic repeatable.
    pub seed: u64,
    /// Settings shared by every PDS host.
    pub pds: PdsConfig,
    /// Faults per PDS host at start (missing entries: none).
    pub pds_faults: Vec<FaultSet>,
    /// The relay's settings.
    pub relay: RelayConfig,
    /// Start a relay at all.
    pub with_relay: bool,
    /// Start a labeler host (its identity is registered in the PLC directory).
    pub with_labeler: bool,
    /// How long `start` waits for the relay to catch up with the seeded events.
    pub ready_timeout: Duration,
}

impl Default for DevnetConfig {
    fn default() -> Self {
        DevnetConfig {
            pds_hosts: 2,
            accounts: 10,
            records: 20,
            rate: 0.0,
            seed: 1,
            pds: PdsConfig::default(),
            pds_faults: Vec::new(),
            relay: RelayConfig::default(),
            with_relay: true,
            with_labeler: false,
            ready_timeout: Duration::from_secs(120),
        }
    }
}

/// Why the devnet could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevnetError {
    /// A listener could not be bound.
    #[error("binding a loopback port: {0}")]
    Bind(#[from] std::io::Error),
    /// Seeding failed.
    #[error("seeding: {0}")]
    Seed(#[from] PdsError),
    /// The labeler's identity could not be registered.
    #[error("registering the labeler: {0}")]
    Labeler(#[from] crate::plc::PlcError),
    /// The relay did not catch up in time.
    #[error("the relay did not catch up with the hosts within {0:?}")]
    NotReady(Duration),
}

/// A running devnet. Dropping it stops every server and the traffic.
pub struct Devnet {
    plc: Plc,
    plc_url: String,
    plc_faults: Faults,
    hosts: Vec<Pds>,
    relay: Option<Relay>,
    labeler: Option<Labeler>,
    dns_addr: SocketAddr,
    accounts: Vec<SeededAccount>,
    seed: u64,
    shutdown: CancellationToken,
    servers: Vec<JoinHandle<()>>,
    traffic: Option<(CancellationToken, std::thread::JoinHandle<()>)>,
    stats: Arc<TrafficStats>,
    admin_password: String,
}

impl std::fmt::Debug for Devnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devnet")
            .field("plc", &self.plc_url)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// Serves `router` on `listener` until `shutdown`.
fn serve(
    listener: FaultyListener,
    router: axum::Router,
    shutdown: &CancellationToken,
) -> JoinHandle<()> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    })
}

impl Devnet {
    /// Binds every server on 127.0.0.1 port 0, seeds the accounts, waits until the relay has
    /// seen every seeded event, and starts the traffic if `rate` is set.
    pub async fn start(config: DevnetConfig) -> Result<Devnet, DevnetError> {
        let shutdown = CancellationToken::new();
        let mut servers = Vec::new();
        let plc = Plc::new();
        let plc_faults = Faults::default();
        let (listener, addr) = FaultyListener::bind_loopback(plc_faults.clone()).await?;
        let plc_url = format!("http://{addr}");
        servers.push(serve(
            listener,
            plc.router().layer(axum::middleware::from_fn_with_state(
                plc_faults.clone(),
                faults::middleware,
            )),
            &shutdown,
        ));

        let mut hosts = Vec::new();
        for index in 0..config.pds_hosts.max(1) {
            let host_faults =
                Faults::new(config.pds_faults.get(index).cloned().unwrap_or_default());
            let (listener, addr) = FaultyListener::bind_loopback(host_faults.clone()).await?;
            let pds_config = PdsConfig {
                clock_id: index as u16,
                ..config.pds.clone()
            };
            let pds = Pds::new(
                format!("http://{addr}"),
                plc.clone(),
                &pds_config,
                host_faults,
                shutdown.clone(),
            );
            servers.push(serve(listener, pds::router(pds.clone()), &shutdown));
            hosts.push(pds);
        }
        for pds in &hosts {
            pds.set_peers(hosts.clone());
        }
        let (dns_addr, dns_servers) = dns::start(hosts.clone(), &shutdown).await?;
        servers.extend(dns_servers);

        let relay = if config.with_relay {
            let relay_faults = Faults::new(config.relay.faults.clone());
            let (listener, addr) = FaultyListener::bind_loopback(relay_faults.clone()).await?;
            let relay = Relay::start(
                format!("http://{addr}"),
                plc_url.clone(),
                hosts.iter().map(|pds| pds.url().to_owned()).collect(),
                &config.relay,
                relay_faults,
                shutdown.clone(),
            );
            servers.push(serve(listener, relay.router(), &shutdown));
            Some(relay)
        } else {
            None
        };

        let labeler = if config.with_labeler {
            let (listener, addr) = FaultyListener::bind_loopback(Faults::default()).await?;
            let labeler = Labeler::new(
                format!("http://{addr}"),
                &plc,
                hosts.first().map(Pds::url).unwrap_or_default(),
                config.seed,
                Faults::default(),
                shutdown.clone(),
            )?;
            servers.push(serve(listener, labeler.router(), &shutdown));
            Some(labeler)
        } else {
            None
        };

        let seed_hosts = hosts.clone();
        let (accounts, records, seed) = (config.accounts, config.records, config.seed);
        let accounts = tokio::task::spawn_blocking(move || {
            traffic::seed(&seed_hosts, accounts, records, seed)
        })
        .await
        .map_err(|err| PdsError::Invalid(format!("seeding task: {err}")))??;

        let mut devnet = Devnet {
            plc,
            plc_url,
            plc_faults,
            hosts,
            relay,
            labeler,
            dns_addr,
            accounts,
            seed: config.seed,
            shutdown,
            servers,
            traffic: None,
            stats: Arc::default(),
            admin_password: config.pds.admin_password.clone(),
        };
        if !devnet.wait_for_relay(config.ready_timeout).await {
            return Err(DevnetError::NotReady(config.ready_timeout));
        }
        if config.rate > 0.0 {
            devnet.start_traffic(config.rate);
        }
        Ok(devnet)
    }

    /// Waits until the relay has taken in every event the hosts have sequenced so far.
    pub async fn wait_for_relay(&self, timeout: Duration) -> bool {
        let Some(relay) = &self.relay else {
            return true;
        };
        let targets: Vec<(String, u64)> = self
            .hosts
            .iter()
            .map(|pds| (pds.url().to_owned(), pds.head_seq()))
            .collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if targets
                .iter()
                .all(|(url, head)| relay.host_cursor(url) >= *head)
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts (or restarts at a new rate) the background writer.
    pub fn start_traffic(&mut self, rate: f64) {
        self.stop_traffic();
        let stop = self.shutdown.child_token();
        let (hosts, accounts, stats) = (
            self.hosts.clone(),
            self.accounts.clone(),
            self.stats.clone(),
        );
        let seed = self.seed;
        let thread_stop = stop.clone();
        let handle = std::thread::spawn(move || {
            traffic::run(hosts, accounts, rate, seed, thread_stop, stats);
        });
        self.traffic = Some((stop, handle));
    }

    /// Stops the background writer and waits for its last commit.
    pub fn stop_traffic(&mut self) {
        if let Some((stop, handle)) = self.traffic.take() {
            stop.cancel();
            let _ = handle.join();
        }
    }

    /// Counters of the background writer.
    pub fn traffic_stats(&self) -> &TrafficStats {
        &self.stats
    }

    /// The PLC directory.
    pub fn plc(&self) -> &Plc {
        &self.plc
    }

    /// The PLC directory's URL.
    pub fn plc_url(&self) -> &str {
        &self.plc_url
    }

    /// The PLC directory's faults.
    pub fn plc_faults(&self) -> &Faults {
        &self.plc_faults
    }

    /// The PDS hosts.
    pub fn hosts(&self) -> &[Pds] {
        &self.hosts
    }

    /// The relay, unless started without one.
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// The labeler, when started with one.
    pub fn labeler(&self) -> Option<&Labeler> {
        self.labeler.as_ref()
    }

    /// The seeded accounts.
    pub fn accounts(&self) -> &[SeededAccount] {
        &self.accounts
    }

    /// The DNS server (UDP and TCP, one port) that answers `TXT _atproto.<handle>` with
    /// `did=<did>` for every handle an account of the devnet holds now, and NXDOMAIN for any
    /// other name: the `dns_nameserver` of a resolver checking devnet handles.
    pub fn dns_addr(&self) -> SocketAddr {
        self.dns_addr
    }

    /// The clients' settings that reach this devnet: its PLC directory and DNS server,
    /// private networks allowed (everything here is on loopback) and did:web over plain
    /// HTTP. The XRPC settings are the defaults, per-host rate limits included.
    pub fn network_config(&self) -> atpdb_identity::NetworkConfig {
        atpdb_identity::NetworkConfig {
            http: atpdb_net::HttpConfig {
                allow_private_network: true,
                ..atpdb_net::HttpConfig::default()
            },
            identity: atpdb_identity::IdentityConfig {
                plc_url: self.plc_url.clone(),
                dns_nameserver: Some(self.dns_addr),
                did_web_scheme: "http".to_owned(),
                ..atpdb_identity::IdentityConfig::default()
            },
            xrpc: atpdb_net::XrpcConfig::default(),
        }
    }

    /// The line `atpdb devnet` prints when ready: where everything answers.
    pub fn ready_info(&self) -> serde_json::Value {
        serde_json::json!({
            "plc": self.plc_url,
            "relay": self.relay.as_ref().map(|relay| relay.url().to_owned()),
            "labeler": self.labeler.as_ref().map(json_labeler),
            "dns": self.dns_addr.to_string(),
            "pds": self.hosts.iter().map(|pds| pds.url().to_owned()).collect::<Vec<_>>(),
            "accounts": self.accounts.len(),
            "admin": {"user": "admin", "password": self.admin_password},
        })
    }

    /// Stops everything and waits for the servers to close.
    pub async fn shutdown(mut self) {
        self.stop_traffic();
        self.shutdown.cancel();
        for server in self.servers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
    }
}

fn json_labeler(labeler: &Labeler) -> serde_json::Value {
    serde_json::json!({"did": labeler.did().as_str(), "url": labeler.url()})
}

impl Drop for Devnet {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.traffic {
            stop.cancel();
        }
        self.shutdown.cancel();
        for server in &self.servers {
            server.abort();
        }
    }
}
