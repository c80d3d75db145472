//! The sync endpoints against a devnet PDS and relay, and what each HTTP fault does to a call.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use atpdb_devnet::faults::{FaultSet, RateLimit, SlowDrip};
use atpdb_devnet::pds::Status;
use atpdb_net::{NetError, RepoBody, XrpcConfig};
use atpdb_repo::syntax::Nsid;
use atpdb_repo::verify::{Expected, VerifyOptions, load_car_async};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::{Error, PATIENCE, TestResult, devnet, fast_config, key_of, write_one, xrpc};

/// Reads a body to its end or its first error.
async fn drain(mut body: RepoBody) -> Result<u64, std::io::Error> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0;
    loop {
        let n = body.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

fn stats_of(client: &atpdb_net::Xrpc, host: &str) -> Result<atpdb_net::HostStats, Error> {
    Ok(client.host_stats(host).ok_or("no stats for the host")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_repo_streams_a_car_that_verifies_and_since_gives_a_diff() -> TestResult {
    let devnet = devnet(2, false).await?;
    let pds = devnet.hosts()[0].clone();
    let account = &devnet.accounts()[0];
    let client = xrpc(fast_config())?;
    let key = key_of(&devnet, &account.did)?;

    let body = client.get_repo(pds.url(), &account.did, None).await?;
    assert!(body.content_length().is_some_and(|len| len > 0));
    let full = load_car_async(body, &VerifyOptions::default()).await?;
    let full_blocks = full.blocks();
    let repo = full.verify(Expected {
        did: Some(&account.did),
        key: &key,
    })?;
    let mut walker = repo.records();
    let mut n_records = 0;
    while walker.next_record()?.is_some() {
        n_records += 1;
    }
    assert_eq!(n_records, 11, "10 records and a profile");
    let before = pds.account_info(&account.did)?.rev;
    assert_eq!(repo.commit().rev, before);

    write_one(&pds, &account.did, 1)?;
    let body = client
        .get_repo(&format!("{}/", pds.url()), &account.did, Some(&before))
        .await?;
    let diff = load_car_async(body, &VerifyOptions::default()).await?;
    let info = pds.account_info(&account.did)?;
    assert_eq!(
        diff.root(),
        info.commit,
        "the diff's root is the new commit"
    );
    assert!(
        diff.blocks() < full_blocks / 2,
        "diff of {} blocks vs full {full_blocks}",
        diff.blocks()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_repos_pages_through_every_account() -> TestResult {
    let devnet = devnet(5, false).await?;
    let pds = devnet.hosts()[0].clone();
    let client = xrpc(fast_config())?;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = client.list_repos(pds.url(), cursor.as_deref(), 2).await?;
        pages += 1;
        assert!(page.repos.len() <= 2);
        assert_eq!(page.skipped, 0);
        for repo in &page.repos {
            let info = pds.account_info(&repo.did)?;
            assert_eq!(repo.head, Some(info.commit), "{}", repo.did);
            assert_eq!(repo.rev.as_ref(), Some(&info.rev), "{}", repo.did);
            assert!(repo.active);
            seen.push(repo.did.clone());
        }
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, pds.dids());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_repos_by_collection_pages_through_the_relay() -> TestResult {
    let devnet = devnet(5, true).await?;
    let relay = devnet.relay().ok_or("no relay")?;
    let client = xrpc(fast_config())?;
    let collection: Nsid = "app.bsky.actor.profile".parse()?;
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = client
            .list_repos_by_collection(relay.url(), &collection, cursor.as_deref(), 2)
            .await?;
        pages += 1;
        assert_eq!(page.skipped, 0);
        seen.extend(page.dids);
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    let every: BTreeSet<_> = devnet.accounts().iter().map(|a| a.did.clone()).collect();
    assert_eq!(seen, every, "every account has a profile");
    assert!(pages >= 3);

    let nobody: Nsid = "com.example.nobody.writes".parse()?;
    let page = client
        .list_repos_by_collection(relay.url(), &nobody, None, 100)
        .await?;
    assert!(page.dids.is_empty() && page.cursor.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_commit_and_status_including_a_deactivated_account() -> TestResult {
    let devnet = devnet(2, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let client = xrpc(fast_config())?;

    let info = pds.account_info(&did)?;
    let latest = client.get_latest_commit(pds.url(), &did).await?;
    assert_eq!((latest.cid, latest.rev), (info.commit, info.rev.clone()));
    let status = client.get_repo_status(pds.url(), &did).await?;
    assert!(status.active);
    assert_eq!(status.status, None);
    assert_eq!(status.rev, Some(info.rev));

    pds.set_status(&did, Status::Deactivated)?;
    let status = client.get_repo_status(pds.url(), &did).await?;
    assert!(!status.active);
    assert_eq!(status.status.as_deref(), Some("deactivated"));
    let before = stats_of(&client, pds.url())?.requests;
    let err = client
        .get_repo(pds.url(), &did, None)
        .await
        .err()
        .ok_or("getRepo of a deactivated account succeeded")?;
    assert_eq!(err.repo_unavailable(), Some("RepoDeactivated"), "{err}");
    assert!(err.is_not_found() && !err.is_transient());
    let err = client
        .get_latest_commit(pds.url(), &did)
        .await
        .err()
        .ok_or("getLatestCommit of a deactivated account succeeded")?;
    assert_eq!(err.repo_unavailable(), Some("RepoDeactivated"), "{err}");
    assert_eq!(
        stats_of(&client, pds.url())?.requests,
        before + 2,
        "permanent errors are not retried"
    );

    let unknown = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".parse()?;
    let err = client
        .get_repo_status(pds.url(), &unknown)
        .await
        .err()
        .ok_or("status of an unknown DID")?;
    assert_eq!(err.repo_unavailable(), Some("RepoNotFound"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_pauses_the_host_for_every_caller() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let client = xrpc(fast_config())?;
    // Prime the host's state so the stats exist.
    client.get_latest_commit(pds.url(), &did).await?;
    pds.faults().set(FaultSet {
        rate_limit: Some(RateLimit {
            retry_after: Some(1),
            ..RateLimit::default()
        }),
        times: Some(1),
        ..FaultSet::default()
    });
    let started = Instant::now();
    let first = {
        let (client, url, did) = (client.clone(), pds.url().to_owned(), did.clone());
        tokio::spawn(async move { client.get_latest_commit(&url, &did).await })
    };
    // A second caller arrives during the pause: it must wait too, without asking the host.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = client.get_repo_status(pds.url(), &did).await?;
    let second_done = started.elapsed();
    first.await??;
    let first_done = started.elapsed();
    assert!(second.active);
    assert!(first_done >= Duration::from_millis(950), "{first_done:?}");
    assert!(second_done >= Duration::from_millis(950), "{second_done:?}");
    assert!(first_done < Duration::from_secs(5), "{first_done:?}");
    let stats = stats_of(&client, pds.url())?;
    assert_eq!(stats.rate_limited, 1, "{stats:?}");
    assert!(
        stats.rate_limit_waits >= 2,
        "both callers waited: {stats:?}"
    );
    assert_eq!(
        stats.requests, 4,
        "priming, the 429, its retry, the second caller: {stats:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_reset_is_honoured_up_to_the_cap() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    // The fault's reset is 300 s away; the cap makes the wait 1.5 s. Without reading the
    // header, the retry would come after the 5 ms backoff.
    let client = xrpc(XrpcConfig {
        max_rate_limit_wait: Duration::from_millis(1500),
        ..fast_config()
    })?;
    pds.faults().set(FaultSet {
        rate_limit: Some(RateLimit {
            ratelimit_headers: true,
            html: true,
            ..RateLimit::default()
        }),
        times: Some(1),
        ..FaultSet::default()
    });
    let started = Instant::now();
    let body = client.get_repo(pds.url(), &did, None).await?;
    drain(body).await?;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1450), "{elapsed:?}");
    let stats = stats_of(&client, pds.url())?;
    assert_eq!(
        (stats.rate_limited, stats.rate_limit_waits),
        (1, 1),
        "{stats:?}"
    );
    assert!(
        stats.rate_limit_wait >= Duration::from_millis(1400),
        "{stats:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_that_never_end_give_rate_limited() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let client = xrpc(XrpcConfig {
        max_retries: 2,
        ..fast_config()
    })?;
    pds.faults().set(FaultSet {
        rate_limit: Some(RateLimit::default()),
        ..FaultSet::default()
    });
    let err = client
        .get_latest_commit(pds.url(), &did)
        .await
        .err()
        .ok_or("a host answering only 429 succeeded")?;
    assert!(matches!(err, NetError::RateLimited { .. }), "{err}");
    assert!(err.is_transient());
    assert_eq!(stats_of(&client, pds.url())?.requests, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_and_client_errors_are_not() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let client = xrpc(fast_config())?;

    pds.faults().set(FaultSet {
        status: Some(503),
        times: Some(2),
        ..FaultSet::default()
    });
    client.get_latest_commit(pds.url(), &did).await?;
    let stats = stats_of(&client, pds.url())?;
    assert_eq!(
        (stats.requests, stats.errors, stats.retries),
        (3, 2, 2),
        "{stats:?}"
    );

    pds.faults().set(FaultSet {
        status: Some(400),
        times: Some(1),
        ..FaultSet::default()
    });
    let err = client
        .get_repo_status(pds.url(), &did)
        .await
        .err()
        .ok_or("a 400 succeeded")?;
    match &err {
        NetError::Xrpc { status, error, .. } => {
            assert_eq!((*status, error.as_deref()), (400, Some("InvalidRequest")));
        }
        other => return Err(format!("expected an XRPC error, got {other:?}").into()),
    }
    assert!(!err.is_transient());
    assert_eq!(stats_of(&client, pds.url())?.requests, 4, "not retried");
    // The fault was used up by that one request, so the host answers again.
    client.get_repo_status(pds.url(), &did).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_html_502_gives_a_short_message() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let client = xrpc(XrpcConfig {
        max_retries: 1,
        ..fast_config()
    })?;
    pds.faults().set(FaultSet {
        status: Some(502),
        ..FaultSet::default()
    });
    let err = client
        .get_repo(pds.url(), &did, None)
        .await
        .err()
        .ok_or("a 502 succeeded")?;
    let text = err.to_string();
    assert!(matches!(err, NetError::Http { status: 502, .. }), "{err:?}");
    assert!(
        text.contains("HTML error page") && text.contains("502 Bad Gateway"),
        "{text}"
    );
    assert!(!text.contains('<') && text.len() < 300, "{text}");
    assert!(err.is_transient());
    assert_eq!(stats_of(&client, pds.url())?.requests, 2, "retried once");
    Ok(())
}

/// A server that answers every request with `head` and `body` as written, then keeps the
/// connection open (`hold`) or closes it.
async fn raw_server(head: String, body: Vec<u8>, hold: bool) -> Result<String, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (head, body) = (head.clone(), body.clone());
            tokio::spawn(async move {
                let mut request = vec![0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(&body).await;
                if hold {
                    tokio::time::sleep(PATIENCE * 2).await;
                }
            });
        }
    });
    Ok(url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_content_length_is_refused_before_reading() -> TestResult {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.ipld.car\r\n\
                content-length: 10000000000\r\n\r\n"
        .to_owned();
    let url = raw_server(head, vec![0u8; 100], true).await?;
    let client = xrpc(fast_config())?;
    let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".parse()?;
    let started = Instant::now();
    let err = client
        .get_repo(&url, &did, None)
        .await
        .err()
        .ok_or("a 10 GB body was accepted")?;
    assert!(
        matches!(err, NetError::TooLarge { limit, .. } if limit == 4 << 30),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_past_the_limit_is_cut_with_an_error() -> TestResult {
    // No Content-Length: the body runs until the connection closes.
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.ipld.car\r\n\
                connection: close\r\n\r\n"
        .to_owned();
    let url = raw_server(head, vec![7u8; 64 * 1024], false).await?;
    let client = xrpc(XrpcConfig {
        max_repo_bytes: 1000,
        ..fast_config()
    })?;
    let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".parse()?;
    let body = client.get_repo(&url, &did, None).await?;
    assert_eq!(body.content_length(), None);
    let err = drain(body).await.err().ok_or("the whole body was read")?;
    let inner = NetError::from_io(&err).ok_or("no NetError inside the io::Error")?;
    assert!(
        matches!(inner, NetError::TooLarge { limit: 1000, .. }),
        "{inner}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_drip_times_out_instead_of_hanging() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();

    // Idle: chunks 2 s apart, idle timeout 300 ms.
    let client = xrpc(XrpcConfig {
        repo_idle_timeout: Duration::from_millis(300),
        ..fast_config()
    })?;
    pds.faults().set(FaultSet {
        slow_drip: Some(SlowDrip {
            chunk_bytes: 256,
            interval_ms: 2000,
        }),
        ..FaultSet::default()
    });
    let started = Instant::now();
    let body = client.get_repo(pds.url(), &did, None).await?;
    let err = drain(body)
        .await
        .err()
        .ok_or("the dripping body was read")?;
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    let inner = NetError::from_io(&err).ok_or("no NetError inside")?;
    assert!(
        matches!(inner, NetError::Timeout { what, .. } if what.contains("no data")),
        "{inner}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // Whole body: chunks every 50 ms never go idle, but the body takes seconds.
    let client = xrpc(XrpcConfig {
        repo_timeout: Duration::from_millis(500),
        ..fast_config()
    })?;
    pds.faults().set(FaultSet {
        slow_drip: Some(SlowDrip {
            chunk_bytes: 64,
            interval_ms: 50,
        }),
        ..FaultSet::default()
    });
    let started = Instant::now();
    let body = client.get_repo(pds.url(), &did, None).await?;
    let err = drain(body)
        .await
        .err()
        .ok_or("the dripping body was read")?;
    let inner = NetError::from_io(&err).ok_or("no NetError inside")?;
    assert!(
        matches!(inner, NetError::Timeout { what, .. } if what.contains("not whole")),
        "{inner}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let stats = stats_of(&client, pds.url())?;
    assert_eq!(stats.errors, 1, "a failed body counts: {stats:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_body_fails_the_read() -> TestResult {
    let devnet = devnet(1, false).await?;
    let pds = devnet.hosts()[0].clone();
    let did = devnet.accounts()[0].did.clone();
    let client = xrpc(fast_config())?;
    pds.faults().set(FaultSet {
        truncate_after: Some(500),
        ..FaultSet::default()
    });
    let body = client.get_repo(pds.url(), &did, None).await?;
    let err = drain(body)
        .await
        .err()
        .ok_or("a truncated body read whole")?;
    let inner = NetError::from_io(&err).ok_or("no NetError inside")?;
    assert!(matches!(inner, NetError::Transport { .. }), "{inner}");
    // The verifier sees the failure too rather than a short CAR.
    let body = client.get_repo(pds.url(), &did, None).await?;
    assert!(
        load_car_async(body, &VerifyOptions::default())
            .await
            .is_err()
    );
    Ok(())
}

#[test]
fn futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let Ok(client) = xrpc(fast_config()) else {
        return;
    };
    let Ok(did) = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".parse() else {
        return;
    };
    assert_send(&client.get_repo("http://127.0.0.1:1", &did, None));
    assert_send(&client.list_repos("http://127.0.0.1:1", None, 10));
    assert_send(&client.get_latest_commit("http://127.0.0.1:1", &did));
}
