//! DNS backend against a small authoritative DNS server on 127.0.0.1, written here with
//! hickory-proto: it serves A and SRV records from a table the test changes while it runs.
#![cfg(feature = "dns")]

mod common;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use hickory_proto::{
    op::{Message, OpCode, ResponseCode},
    rr::{
        rdata::{A, AAAA, SRV},
        Name, RData, Record, RecordType,
    },
};
use keel_core::{AdminState, Shutdown};
use keel_discovery::{Backend, Discover, DiscoveryConfig, DnsConfig, DnsDiscovery, DnsRecord};
use tokio::net::UdpSocket;

type Zone = Arc<Mutex<HashMap<(String, RecordType), Vec<RData>>>>;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// Answers every query from `zone` (TTL 1 s), with the A records of SRV targets as additionals.
async fn dns_server(zone: Zone) -> std::net::SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::response(req.metadata.id, OpCode::Query);
            resp.metadata.authoritative = true;
            resp.metadata.recursion_desired = req.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            let z = zone.lock().unwrap().clone();
            for q in &req.queries {
                resp.add_query(q.clone());
                let key = (q.name().to_ascii().to_lowercase(), q.query_type());
                match z.get(&key) {
                    Some(rdatas) => {
                        for rd in rdatas {
                            resp.add_answer(Record::from_rdata(q.name().clone(), 1, rd.clone()));
                            if let RData::SRV(srv) = rd {
                                let t = (srv.target.to_ascii().to_lowercase(), RecordType::A);
                                for a in z.get(&t).into_iter().flatten() {
                                    resp.add_additional(Record::from_rdata(
                                        srv.target.clone(),
                                        1,
                                        a.clone(),
                                    ));
                                }
                            }
                        }
                    }
                    None => resp.metadata.response_code = ResponseCode::NXDomain,
                }
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

fn a(ip: [u8; 4]) -> RData {
    RData::A(A(Ipv4Addr::from(ip)))
}

fn srv(priority: u16, weight: u16, port: u16, target: &str) -> RData {
    RData::SRV(SRV::new(priority, weight, port, name(target)))
}

fn config(server: std::net::SocketAddr, dns: DnsConfig) -> DiscoveryConfig {
    DiscoveryConfig {
        backend: Backend::Dns,
        url: Some(server.to_string()),
        dns,
        confirm_reads: 3,
        ..Default::default()
    }
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_records_are_re_resolved_on_ttl_and_a_bogus_empty_answer_is_held() {
    let zone: Zone = Default::default();
    zone.lock().unwrap().insert(
        ("web.test.".into(), RecordType::A),
        vec![a([127, 0, 0, 1]), a([127, 0, 0, 2])],
    );
    let server = dns_server(zone.clone()).await;
    let cfg = config(
        server,
        DnsConfig {
            name: "{service}.test.".into(),
            record: DnsRecord::A,
            port: 8080,
            min_ttl: Duration::from_millis(200),
            max_ttl: Duration::from_millis(300),
        },
    );
    let d = DnsDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let w = d.watch(&svc("web")).unwrap();
    wait_len(&w, 2, LIMIT).await;
    assert!(w.snapshot().iter().all(|i| i.addr.port() == 8080));

    zone.lock().unwrap().insert(
        ("web.test.".into(), RecordType::AAAA),
        vec![RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))],
    );
    wait_len(&w, 3, LIMIT).await;
    assert!(
        w.snapshot().iter().any(|i| i.addr.is_ipv6()),
        "AAAA records too"
    );

    // The name disappears (a bogus NXDOMAIN): held, then believed after 3 reads in a row.
    zone.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(w.snapshot().len(), 3, "one empty answer is not believed");
    wait_len(&w, 0, LIMIT).await;
}

#[tokio::test]
async fn srv_priority_makes_backups_weight_is_kept_and_bad_records_are_skipped() {
    let zone: Zone = Default::default();
    {
        let mut z = zone.lock().unwrap();
        z.insert(
            ("_http._tcp.api.test.".into(), RecordType::SRV),
            vec![
                srv(10, 5, 8001, "a.test."),
                srv(10, 0, 8002, "b.test."),
                srv(20, 1, 8003, "c.test."),
                srv(10, 1, 0, "a.test."),          // port 0: skipped
                srv(10, 1, 8004, "nowhere.test."), // does not resolve: skipped
            ],
        );
        z.insert(("a.test.".into(), RecordType::A), vec![a([127, 0, 0, 1])]);
        z.insert(("b.test.".into(), RecordType::A), vec![a([127, 0, 0, 2])]);
        z.insert(("c.test.".into(), RecordType::A), vec![a([127, 0, 0, 3])]);
    }
    let server = dns_server(zone.clone()).await;
    let cfg = config(
        server,
        DnsConfig {
            name: "_http._tcp.{service}.test.".into(),
            record: DnsRecord::Srv,
            min_ttl: Duration::from_millis(200),
            ..Default::default()
        },
    );
    let d = DnsDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let (set, ttl) = d.resolve(&svc("api")).await.unwrap();
    assert!(ttl <= Duration::from_secs(1), "{ttl:?}");
    let by_port: HashMap<u16, _> = set.iter().map(|i| (i.addr.port(), i.clone())).collect();
    assert_eq!(by_port.len(), 3, "{set:?}");
    assert_eq!(by_port[&8001].weight, 5);
    assert_eq!(by_port[&8001].state, AdminState::Up);
    assert_eq!(by_port[&8002].weight, 1, "SRV weight 0 counts as 1");
    assert_eq!(by_port[&8003].state, AdminState::Backup);
    assert_eq!(by_port[&8003].addr.ip().to_string(), "127.0.0.3");

    let w = d.watch(&svc("api")).unwrap();
    wait_len(&w, 3, LIMIT).await;
}

#[tokio::test]
async fn when_every_lowest_priority_srv_record_is_unusable_the_next_priority_is_primary() {
    let zone: Zone = Default::default();
    {
        let mut z = zone.lock().unwrap();
        z.insert(
            ("_http._tcp.api.test.".into(), RecordType::SRV),
            vec![
                srv(5, 1, 0, "d.test."),          // port 0: skipped
                srv(5, 1, 8000, "nowhere.test."), // does not resolve: skipped
                srv(10, 1, 8001, "a.test."),
                srv(10, 1, 8002, "b.test."),
                srv(20, 1, 8003, "c.test."),
            ],
        );
        z.insert(("a.test.".into(), RecordType::A), vec![a([127, 0, 0, 1])]);
        z.insert(("b.test.".into(), RecordType::A), vec![a([127, 0, 0, 2])]);
        z.insert(("c.test.".into(), RecordType::A), vec![a([127, 0, 0, 3])]);
        z.insert(("d.test.".into(), RecordType::A), vec![a([127, 0, 0, 4])]);
    }
    let server = dns_server(zone.clone()).await;
    let cfg = config(
        server,
        DnsConfig {
            name: "_http._tcp.{service}.test.".into(),
            record: DnsRecord::Srv,
            ..Default::default()
        },
    );
    let d = DnsDiscovery::from_config(&cfg, Shutdown::new()).unwrap();
    let (set, _) = d.resolve(&svc("api")).await.unwrap();
    assert_eq!(set.len(), 3, "{set:?}");
    let by_port: HashMap<u16, _> = set.iter().map(|i| (i.addr.port(), i.state)).collect();
    assert_eq!(by_port[&8001], AdminState::Up, "{set:?}");
    assert_eq!(by_port[&8002], AdminState::Up, "{set:?}");
    assert_eq!(by_port[&8003], AdminState::Backup, "{set:?}");
}
