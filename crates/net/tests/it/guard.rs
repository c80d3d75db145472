//! Without `allow_private_network`, no client dials loopback.

use std::time::Duration;

use atpdb_net::{Firehose, FirehoseConfig, FirehoseEvent, Http, HttpConfig, NetError, Xrpc};
use atpdb_repo::syntax::{Did, Nsid};
use tokio::net::TcpListener;

use crate::common::{TestResult, fast_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_refuses_loopback_before_dialling() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let http = Http::new(&HttpConfig::default())?;
    let client = Xrpc::new(http.clone(), fast_config());
    let did: Did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".parse()?;
    let collection: Nsid = "app.bsky.feed.post".parse()?;

    let refused = |result: Result<(), NetError>, what: &str| match result {
        Err(NetError::PrivateAddress { .. }) => Ok(()),
        other => Err(format!("{what}: expected PrivateAddress, got {other:?}")),
    };
    refused(client.get_repo(&url, &did, None).await.map(drop), "getRepo")?;
    refused(
        client.list_repos(&url, None, 10).await.map(drop),
        "listRepos",
    )?;
    refused(
        client
            .list_repos_by_collection(&url, &collection, None, 10)
            .await
            .map(drop),
        "listReposByCollection",
    )?;
    refused(
        client.get_latest_commit(&url, &did).await.map(drop),
        "getLatestCommit",
    )?;
    refused(
        client.get_repo_status(&url, &did).await.map(drop),
        "getRepoStatus",
    )?;
    refused(
        client
            .get_repo("http://localhost:1", &did, None)
            .await
            .map(drop),
        "getRepo by name",
    )?;

    let mut firehose = Firehose::connect(&http, FirehoseConfig::new(url.clone()));
    match firehose.next().await {
        FirehoseEvent::Disconnected { reason, .. } => {
            assert!(reason.contains("loopback"), "{reason}");
        }
        other => return Err(format!("firehose: expected Disconnected, got {other:?}").into()),
    }
    let mut by_name = Firehose::connect(&http, FirehoseConfig::new("http://localhost:1"));
    assert!(
        matches!(by_name.next().await, FirehoseEvent::Disconnected { reason, .. } if reason.contains("loopback"))
    );

    // Nothing reached the listener.
    let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(accepted.is_err(), "a connection reached 127.0.0.1");
    Ok(())
}
