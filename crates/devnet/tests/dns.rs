//! Devnet handles verify both ways: the devnet's DNS server answers `_atproto.<handle>` TXT
//! for every handle its hosts hold now, and each host serves `/.well-known/atproto-did`.
//!
//! Most tests go through the identity crate's [`Resolver`], as the sync engine does; a few
//! speak DNS directly to pin what the server answers.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use atpdb_devnet::{Devnet, DevnetConfig};
use atpdb_identity::{IdentityConfig, IdentityError, Resolver};
use atpdb_net::{Http, HttpConfig};
use atpdb_repo::syntax::{Did, Handle};
use common::{PATIENCE, TestResult, http};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

type Error = Box<dyn std::error::Error>;

async fn small() -> Result<Devnet, Error> {
    Ok(Devnet::start(DevnetConfig {
        pds_hosts: 2,
        accounts: 4,
        records: 2,
        with_relay: false,
        ..DevnetConfig::default()
    })
    .await?)
}

/// A resolver asking the devnet's PLC directory and DNS server, through a client that may
/// dial loopback. Its HTTPS fallback dials the handle's own name, which does not resolve
/// here: a handle that verifies verified through DNS.
fn resolver(devnet: &Devnet) -> Result<Resolver, Error> {
    resolver_with(IdentityConfig {
        plc_url: devnet.plc_url().to_owned(),
        dns_nameserver: Some(devnet.dns_addr()),
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
}

/// As [`resolver`], with the HTTPS fallback sent to the PDS at `pds_url`: a handle neither
/// the DNS server nor that host knows is then definitely absent, not unreachable.
fn resolver_asking_host(devnet: &Devnet, pds_url: &str) -> Result<Resolver, Error> {
    resolver_with(IdentityConfig {
        plc_url: devnet.plc_url().to_owned(),
        dns_nameserver: Some(devnet.dns_addr()),
        did_web_scheme: "http".to_owned(),
        handle_well_known_addr: Some(pds_url.trim_start_matches("http://").parse()?),
        timeout: Duration::from_secs(5),
        ..Default::default()
    })
}

fn resolver_with(config: IdentityConfig) -> Result<Resolver, Error> {
    let http = Http::new(&HttpConfig {
        allow_private_network: true,
        ..HttpConfig::default()
    })?;
    Ok(Resolver::new(config, http)?)
}

/// Asks `addr` one question over UDP and returns the reply.
async fn ask(addr: SocketAddr, name: &str, query_type: RecordType) -> Result<Message, Error> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    socket.send_to(&query(name, query_type)?, addr).await?;
    let mut buffer = vec![0u8; 4096];
    let len = tokio::time::timeout(PATIENCE, socket.recv(&mut buffer))
        .await
        .map_err(|_| format!("no DNS reply to {name} {query_type}"))??;
    Ok(Message::from_vec(buffer.get(..len).ok_or("reply length")?)?)
}

fn query(name: &str, query_type: RecordType) -> Result<Vec<u8>, Error> {
    let mut message = Message::new(0x5eed, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name)?, query_type));
    Ok(message.to_vec()?)
}

/// The `did=` TXT strings of a reply, joined per record.
fn txt_answers(reply: &Message) -> Vec<String> {
    reply
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::TXT(txt) => Some(txt.txt_data.iter().flatten().copied().collect()),
            _ => None,
        })
        .map(|bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned())
        .collect()
}

/// Asserts that `_atproto.<handle>` answers `did=<did>`.
async fn assert_dns_answers(devnet: &Devnet, handle: &str, did: &Did) -> TestResult {
    let reply = ask(
        devnet.dns_addr(),
        &format!("_atproto.{handle}."),
        RecordType::TXT,
    )
    .await?;
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NoError,
        "{handle}"
    );
    assert_eq!(txt_answers(&reply), vec![format!("did={did}")], "{handle}");
    Ok(())
}

/// Asserts that `_atproto.<handle>` is NXDOMAIN.
async fn assert_dns_nxdomain(devnet: &Devnet, handle: &str) -> TestResult {
    let reply = ask(
        devnet.dns_addr(),
        &format!("_atproto.{handle}."),
        RecordType::TXT,
    )
    .await?;
    assert_eq!(
        reply.metadata.response_code,
        ResponseCode::NXDomain,
        "{handle}: {:?}",
        reply.answers
    );
    assert!(reply.answers.is_empty(), "{handle}: {:?}", reply.answers);
    Ok(())
}

fn is_absent(answer: &Result<Did, IdentityError>) -> bool {
    matches!(answer, Err(err @ IdentityError::Handle { .. }) if !err.is_transient())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seeded_handle_verifies_through_dns() -> TestResult {
    let devnet = small().await?;
    assert_eq!(
        devnet.ready_info()["dns"],
        json!(devnet.dns_addr().to_string())
    );
    assert!(devnet.dns_addr().ip().is_loopback());
    let resolver = resolver(&devnet)?;
    for account in devnet.accounts() {
        assert_eq!(
            resolver.resolve_handle(&account.handle).await?,
            account.did,
            "{}",
            account.handle
        );
        let identity = resolver.resolve(&account.did).await?;
        assert_eq!(
            resolver.verified_handle(&identity).await.as_ref(),
            Some(&account.handle),
            "{}",
            account.did
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_handle_verifies_and_the_old_one_stops_resolving() -> TestResult {
    let devnet = small().await?;
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let host = &devnet.hosts()[account.pds];
    let resolver = resolver_asking_host(&devnet, host.url())?;
    let identity = resolver.resolve(&account.did).await?;
    assert_eq!(
        resolver.verified_handle(&identity).await.as_ref(),
        Some(&account.handle)
    );

    let renamed: Handle = "Renamed-0.test".parse()?;
    host.set_handle(&account.did, renamed.clone())?;
    let identity = resolver.refresh(&account.did).await?;
    assert_eq!(identity.handle.as_ref(), Some(&renamed));
    assert_eq!(
        resolver.verified_handle(&identity).await.as_ref(),
        Some(&renamed)
    );
    let old = resolver.resolve_handle(&account.handle).await;
    assert!(is_absent(&old), "old handle: {old:?}");
    assert_dns_nxdomain(&devnet, account.handle.as_str()).await?;
    assert_dns_answers(&devnet, "RENAMED-0.test", &account.did).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_changed_through_the_admin_api_answers_at_once() -> TestResult {
    let devnet = small().await?;
    let account = devnet.accounts().get(1).ok_or("no second account")?;
    let host = &devnet.hosts()[account.pds];
    assert_dns_answers(&devnet, account.handle.as_str(), &account.did).await?;
    let response = http()
        .post(format!(
            "{}/admin/accounts/{}/handle",
            host.url(),
            account.did
        ))
        .basic_auth("admin", Some("admin"))
        .json(&json!({"handle": "by-admin.test"}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_dns_answers(&devnet, "by-admin.test", &account.did).await?;
    assert_dns_nxdomain(&devnet, account.handle.as_str()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_account_answers_from_its_new_host_only() -> TestResult {
    let devnet = small().await?;
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let old = &devnet.hosts()[account.pds];
    let new = &devnet.hosts()[(account.pds + 1) % devnet.hosts().len()];
    old.migrate(&account.did, new)?;
    assert_dns_answers(&devnet, account.handle.as_str(), &account.did).await?;
    // The old host keeps a deactivated copy under the old handle; it must not answer once
    // the new host has renamed the account.
    new.set_handle(&account.did, "moved-on.test".parse()?)?;
    assert_dns_answers(&devnet, "moved-on.test", &account.did).await?;
    assert_dns_nxdomain(&devnet, account.handle.as_str()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_handle_is_not_found() -> TestResult {
    let devnet = small().await?;
    let resolver = resolver_asking_host(&devnet, devnet.hosts()[0].url())?;
    let answer = resolver.resolve_handle(&"nobody.test".parse()?).await;
    assert!(is_absent(&answer), "{answer:?}");
    assert_dns_nxdomain(&devnet, "nobody.test").await?;
    // Only `_atproto.` names exist.
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let bare = ask(
        devnet.dns_addr(),
        &format!("{}.", account.handle),
        RecordType::TXT,
    )
    .await?;
    assert_eq!(bare.metadata.response_code, ResponseCode::NXDomain);
    // Other types of a held name: no error, no answers.
    let a = ask(
        devnet.dns_addr(),
        &format!("_atproto.{}.", account.handle),
        RecordType::A,
    )
    .await?;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.answers.is_empty(), "{:?}", a.answers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_packets_get_no_reply_and_the_server_keeps_answering() -> TestResult {
    let devnet = small().await?;
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let mut response = Message::from_vec(&query("_atproto.user0.test.", RecordType::TXT)?)?;
    response.metadata.message_type = MessageType::Response;
    let garbage: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0x00],
        vec![0xff; 12],
        // One question whose name is a compression pointer to itself.
        vec![
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c,
        ],
        vec![0xab; 9000],
        // A response: answering it could loop two servers into each other.
        response.to_vec()?,
    ];
    for packet in &garbage {
        socket.send_to(packet, devnet.dns_addr()).await?;
    }
    let mut buffer = vec![0u8; 4096];
    let reply = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buffer)).await;
    assert!(reply.is_err(), "a garbage packet was answered: {reply:?}");

    let account = devnet.accounts().first().ok_or("no accounts")?;
    assert_dns_answers(&devnet, account.handle.as_str(), &account.did).await?;
    let resolver = resolver(&devnet)?;
    assert_eq!(resolver.resolve_handle(&account.handle).await?, account.did);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_answers_length_prefixed_queries() -> TestResult {
    let devnet = small().await?;
    let account = devnet.accounts().first().ok_or("no accounts")?;
    let mut stream = TcpStream::connect(devnet.dns_addr()).await?;
    for _ in 0..2 {
        let packet = query(&format!("_atproto.{}.", account.handle), RecordType::TXT)?;
        stream
            .write_all(&u16::try_from(packet.len())?.to_be_bytes())
            .await?;
        stream.write_all(&packet).await?;
        let len = tokio::time::timeout(PATIENCE, stream.read_u16()).await??;
        let mut reply = vec![0u8; usize::from(len)];
        stream.read_exact(&mut reply).await?;
        let reply = Message::from_vec(&reply)?;
        assert_eq!(txt_answers(&reply), vec![format!("did={}", account.did)]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_stops_with_the_devnet() -> TestResult {
    let devnet = small().await?;
    let addr = devnet.dns_addr();
    devnet.shutdown().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "TCP still listening"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_known_atproto_did_answers_by_host() -> TestResult {
    let devnet = small().await?;
    let well_known = |pds_url: &str, host: &str| {
        http()
            .get(format!("{pds_url}/.well-known/atproto-did"))
            .header(reqwest::header::HOST, host)
            .send()
    };
    for account in devnet.accounts() {
        let home = devnet.hosts()[account.pds].url();
        for host in [
            account.handle.to_string(),
            format!("{}:443", account.handle),
            account.handle.as_str().to_ascii_uppercase(),
        ] {
            let response = well_known(home, &host).await?;
            assert_eq!(response.status(), 200, "{host}");
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert!(content_type.starts_with("text/plain"), "{content_type}");
            assert_eq!(response.text().await?, account.did.as_str(), "{host}");
        }
        // Another host does not answer for it.
        let other = devnet.hosts()[(account.pds + 1) % devnet.hosts().len()].url();
        assert_eq!(
            well_known(other, account.handle.as_str()).await?.status(),
            404
        );
    }
    let home = devnet.hosts()[0].url();
    for host in ["nobody.test", "127.0.0.1", "not_a_handle"] {
        assert_eq!(well_known(home, host).await?.status(), 404, "{host}");
    }
    Ok(())
}
