//! The clients a process reaches other hosts with, built together from one configuration.

use atpdb_net::{Http, HttpConfig, Xrpc, XrpcConfig};

use crate::{IdentityConfig, IdentityError, Resolver};

/// How a process reaches other hosts: one guarded HTTP client ([`HttpConfig`], where the
/// private-network switch lives), the identity resolver and the XRPC client over it.
///
/// Every component that talks to the network (the sync engine, the fleet's stages, the
/// benchmarks, the tests) builds its clients from this, so the SSRF guard and the connection
/// pool are set in one place and cannot differ between the resolver and the XRPC calls.
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    /// The HTTP client both clients share.
    pub http: HttpConfig,
    /// PLC directory, DNS, caches.
    pub identity: IdentityConfig,
    /// Per-host limits, retries, repo size and time limits.
    pub xrpc: XrpcConfig,
}

/// The clients [`NetworkConfig`] describes. Cloning is cheap: clones share the connection
/// pool, the identity cache and the per-host limits.
#[derive(Clone)]
pub struct Network {
    /// The guarded HTTP client.
    pub http: Http,
    /// DIDs and handles.
    pub resolver: Resolver,
    /// XRPC calls to PDSes and relays.
    pub xrpc: Xrpc,
}

impl Network {
    /// Builds the clients.
    ///
    /// # Errors
    ///
    /// [`IdentityError::Net`] when the HTTP client cannot be built, and what
    /// [`Resolver::new`] refuses (a malformed PLC URL).
    pub fn new(config: NetworkConfig) -> Result<Network, IdentityError> {
        let http = Http::new(&config.http)?;
        let resolver = Resolver::new(config.identity, http.clone())?;
        let xrpc = Xrpc::new(http.clone(), config.xrpc);
        Ok(Network {
            http,
            resolver,
            xrpc,
        })
    }
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("http", &self.http)
            .field("xrpc", &self.xrpc)
            .finish_non_exhaustive()
    }
}
