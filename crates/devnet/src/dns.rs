//! An authoritative DNS server on loopback answering `_atproto.<handle>` TXT for every handle a
//! devnet account holds, so that handles verify both ways.
//!
//! Devnet handles (`user3.test`) exist nowhere else: without this server a sync engine's
//! bidirectional handle check reports every account as `handle.invalid`. A resolver pointed at
//! [`crate::Devnet::dns_addr`] gets `"did=<did>"` for a handle a PDS host of the devnet holds
//! now. Nothing is copied: every query looks the handle up in the hosts' account state, so a
//! handle change is visible to the next query.
//!
//! What it answers, over UDP and TCP on one port of 127.0.0.1:
//!
//! - `TXT _atproto.<handle>` of a held handle: one record, `did=<did>`, TTL 0 (the answer
//!   may change at any moment; callers cache above it).
//! - Any other type for such a name: NOERROR with no answers.
//! - Any other name: NXDOMAIN. Names compare case-insensitively; the question's spelling is
//!   echoed.
//! - Not a single-question standard query: FORMERR or NOTIMP. A class other than IN: REFUSED.
//! - Packets that do not parse, and responses: ignored, nothing is sent back.
//!
//! Work per packet is bounded: one parse of at most [`MAX_UDP_QUERY`] bytes (a TCP message is
//! at most 65535 by its length prefix), one question, one lookup per host. TCP connections are
//! capped at [`MAX_TCP_CONNECTIONS`] and closed after [`TCP_IDLE`] without a complete query.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use atpdb_repo::syntax::{Did, Handle};
use hickory_proto::op::{
    DEFAULT_MAX_PAYLOAD_LEN, Edns, Message, MessageType, OpCode, ResponseCode,
};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::pds::Pds;

/// Largest UDP datagram read; longer ones are cut, and then rarely parse.
const MAX_UDP_QUERY: usize = 4096;

/// TCP connections served at once; more are closed on accept.
const MAX_TCP_CONNECTIONS: usize = 64;

/// How long a TCP connection may take to send a query or take a reply.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// How often binding is retried when the UDP port is taken for TCP.
const BIND_ATTEMPTS: usize = 16;

/// Where the answers come from: the devnet's PDS hosts, asked live.
#[derive(Clone)]
struct Zone {
    hosts: Arc<[Pds]>,
}

impl Zone {
    fn did(&self, handle: &Handle) -> Option<Did> {
        self.hosts.iter().find_map(|pds| pds.did_for_handle(handle))
    }
}

/// Binds UDP and TCP on one port of 127.0.0.1 and serves `hosts`' handles until `shutdown`.
/// Returns the address and the two server tasks.
pub(crate) async fn start(
    hosts: Vec<Pds>,
    shutdown: &CancellationToken,
) -> std::io::Result<(SocketAddr, Vec<JoinHandle<()>>)> {
    let (udp, tcp) = bind_pair().await?;
    let addr = udp.local_addr()?;
    let zone = Zone {
        hosts: hosts.into(),
    };
    let tasks = vec![
        tokio::spawn(serve_udp(udp, zone.clone(), shutdown.clone())),
        tokio::spawn(serve_tcp(tcp, zone, shutdown.clone())),
    ];
    Ok((addr, tasks))
}

/// A UDP socket on 127.0.0.1 port 0 and a TCP listener on the same port.
async fn bind_pair() -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(err) if attempt >= BIND_ATTEMPTS => return Err(err),
            Err(_) => continue,
        }
    }
}

async fn serve_udp(socket: UdpSocket, zone: Zone, shutdown: CancellationToken) {
    let mut buffer = vec![0u8; MAX_UDP_QUERY];
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (len, peer) = match received {
            Ok(received) => received,
            Err(err) => {
                tracing::debug!(%err, "dns: UDP receive failed");
                continue;
            }
        };
        let Some(packet) = buffer.get(..len) else {
            continue;
        };
        if let Some(reply) = udp_reply(packet, |handle| zone.did(handle)) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Zone, shutdown: CancellationToken) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors, most likely: give connections time to close.
                tracing::debug!(%err, "dns: TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        let (zone, shutdown) = (zone.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown
                .run_until_cancelled(serve_connection(stream, zone))
                .await;
            drop(permit);
        });
    }
}

/// Length-prefixed queries and replies (RFC 1035 4.2.2) until the peer stops, stalls or sends
/// something that does not parse.
async fn serve_connection(mut stream: TcpStream, zone: Zone) {
    let mut query = Vec::new();
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, stream.read_u16()).await else {
            return;
        };
        query.resize(usize::from(len), 0);
        let Ok(Ok(_)) = tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await else {
            return;
        };
        let Some(reply) = tcp_reply(&query, |handle| zone.did(handle)) else {
            return;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(2 + reply.len());
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

/// The encoded UDP reply to one packet, `None` when the packet is ignored. A reply longer
/// than the asker takes (512 bytes, or what its EDNS record offers up to the 1232 this server
/// offers) is replaced by a truncated one (TC set), which tells the asker to retry over TCP.
fn udp_reply(packet: &[u8], lookup: impl Fn(&Handle) -> Option<Did>) -> Option<Vec<u8>> {
    let (query, response) = exchange(packet, lookup)?;
    let bytes = response.to_vec().ok()?;
    let limit = usize::from(query.max_payload().min(DEFAULT_MAX_PAYLOAD_LEN));
    if bytes.len() > limit {
        return response.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// The encoded TCP reply to one message (without the length prefix), `None` when the message
/// is ignored.
fn tcp_reply(packet: &[u8], lookup: impl Fn(&Handle) -> Option<Did>) -> Option<Vec<u8>> {
    exchange(packet, lookup)?.1.to_vec().ok()
}

/// The query in `packet` and the response to it; `None` when the packet does not parse or is
/// not a query.
fn exchange(packet: &[u8], lookup: impl Fn(&Handle) -> Option<Did>) -> Option<(Message, Message)> {
    let query = Message::from_vec(packet).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let response = answer(&query, lookup);
    Some((query, response))
}

/// The response to a parsed query.
fn answer(query: &Message, lookup: impl Fn(&Handle) -> Option<Did>) -> Message {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.checking_disabled = query.metadata.checking_disabled;
    response.queries = query.queries.clone();
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(DEFAULT_MAX_PAYLOAD_LEN);
        response.edns = Some(edns);
    }
    let code = &mut response.metadata.response_code;
    if query.metadata.op_code != OpCode::Query {
        *code = ResponseCode::NotImp;
        return response;
    }
    let [question] = query.queries.as_slice() else {
        *code = ResponseCode::FormErr;
        return response;
    };
    if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY) {
        *code = ResponseCode::Refused;
        return response;
    }
    let Some(did) = atproto_handle(question.name()).and_then(|handle| lookup(&handle)) else {
        *code = ResponseCode::NXDomain;
        return response;
    };
    if matches!(question.query_type(), RecordType::TXT | RecordType::ANY) {
        let text = format!("did={did}");
        // A TXT character-string holds at most 255 bytes; readers join the strings.
        let strings: Vec<&[u8]> = text.as_bytes().chunks(255).collect();
        response.answers.push(Record::from_rdata(
            question.name().clone(),
            0,
            RData::TXT(TXT::from_bytes(strings)),
        ));
    }
    response
}

/// The handle `name` asks about when it is `_atproto.<handle>`, in any case.
fn atproto_handle(name: &Name) -> Option<Handle> {
    let mut labels = name.iter();
    if !labels.next()?.eq_ignore_ascii_case(b"_atproto") {
        return None;
    }
    let mut handle = String::new();
    for label in labels {
        // A dot inside a label would read as a label boundary once joined.
        if label.contains(&b'.') {
            return None;
        }
        if !handle.is_empty() {
            handle.push('.');
        }
        handle.push_str(std::str::from_utf8(label).ok()?);
    }
    handle.parse().ok()
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";

    fn lookup(handle: &Handle) -> Option<Did> {
        if handle.as_str() == "alice.test" {
            DID.parse().ok()
        } else {
            None
        }
    }

    fn query(name: &str, query_type: RecordType) -> Result<Message, Box<dyn std::error::Error>> {
        let mut message = Message::new(0x1234, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name)?, query_type));
        Ok(message)
    }

    fn ask(query: &Message) -> Result<Message, Box<dyn std::error::Error>> {
        let reply = udp_reply(&query.to_vec()?, lookup).ok_or("no reply")?;
        Ok(Message::from_vec(&reply)?)
    }

    fn txt_strings(message: &Message) -> Vec<String> {
        message
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::TXT(txt) => Some(txt.txt_data.iter().flatten().copied().collect()),
                _ => None,
            })
            .map(|bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned())
            .collect()
    }

    #[test]
    fn txt_of_a_held_handle_names_its_did() -> TestResult {
        let query = query("_ATProto.Alice.TEST.", RecordType::TXT)?;
        let reply = ask(&query)?;
        assert_eq!(reply.metadata.id, query.metadata.id);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.metadata.authoritative);
        assert!(reply.metadata.recursion_desired);
        assert_eq!(txt_strings(&reply), vec![format!("did={DID}")]);
        let name = reply.answers.first().map(|record| record.name.to_ascii());
        assert_eq!(
            name.as_deref(),
            Some("_ATProto.Alice.TEST."),
            "spelling echoed"
        );
        Ok(())
    }

    #[test]
    fn other_types_of_a_held_name_are_empty() -> TestResult {
        for query_type in [RecordType::A, RecordType::AAAA, RecordType::MX] {
            let reply = ask(&query("_atproto.alice.test.", query_type)?)?;
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NoError,
                "{query_type}"
            );
            assert!(
                reply.answers.is_empty(),
                "{query_type}: {:?}",
                reply.answers
            );
        }
        Ok(())
    }

    #[test]
    fn other_names_are_nxdomain() -> TestResult {
        for name in [
            "_atproto.bob.test.",
            "alice.test.",
            "_atproto.",
            "_dmarc.alice.test.",
            "x._atproto.alice.test.",
        ] {
            let reply = ask(&query(name, RecordType::TXT)?)?;
            assert_eq!(
                reply.metadata.response_code,
                ResponseCode::NXDomain,
                "{name}"
            );
            assert!(reply.answers.is_empty(), "{name}");
        }
        Ok(())
    }

    #[test]
    fn two_questions_are_formerr_and_updates_notimp() -> TestResult {
        let mut two = query("_atproto.alice.test.", RecordType::TXT)?;
        two.add_query(Query::query(
            Name::from_ascii("_atproto.alice.test.")?,
            RecordType::TXT,
        ));
        assert_eq!(ask(&two)?.metadata.response_code, ResponseCode::FormErr);

        let mut update = query("_atproto.alice.test.", RecordType::TXT)?;
        update.metadata.op_code = OpCode::Update;
        let reply = ask(&update)?;
        assert_eq!(reply.metadata.response_code, ResponseCode::NotImp);
        assert!(reply.answers.is_empty());
        Ok(())
    }

    #[test]
    fn garbage_and_responses_are_ignored() -> TestResult {
        for packet in [
            &b""[..],
            &b"\x00"[..],
            &[0xff; 12][..],
            // One question whose name is a compression pointer to itself.
            &[
                0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c,
            ][..],
            // One question, cut off inside its name.
            &[
                0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 8, b'_',
            ][..],
        ] {
            assert!(udp_reply(packet, lookup).is_none(), "{packet:?}");
            assert!(tcp_reply(packet, lookup).is_none(), "{packet:?}");
        }
        let mut response = query("_atproto.alice.test.", RecordType::TXT)?;
        response.metadata.message_type = MessageType::Response;
        assert!(udp_reply(&response.to_vec()?, lookup).is_none());
        Ok(())
    }

    #[test]
    fn a_long_did_is_split_into_character_strings() -> TestResult {
        let long: Did = format!("did:web:{}.test", "a".repeat(300)).parse()?;
        let packet = query("_atproto.alice.test.", RecordType::TXT)?.to_vec()?;
        let reply = tcp_reply(&packet, |_| Some(long.clone())).ok_or("no reply")?;
        let decoded = Message::from_vec(&reply)?;
        assert_eq!(txt_strings(&decoded), vec![format!("did={long}")]);
        Ok(())
    }

    #[test]
    fn a_udp_reply_too_long_for_the_asker_is_truncated() -> TestResult {
        let long: Did = format!("did:web:{}.test", "a".repeat(600)).parse()?;
        let packet = query("_atproto.alice.test.", RecordType::TXT)?.to_vec()?;
        let reply = udp_reply(&packet, |_| Some(long.clone())).ok_or("no reply")?;
        assert!(reply.len() <= 512, "{} bytes", reply.len());
        let decoded = Message::from_vec(&reply)?;
        assert!(decoded.metadata.truncation);
        assert!(decoded.answers.is_empty());
        Ok(())
    }
}
