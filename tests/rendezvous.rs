//! The id rendezvous that ranks in separate processes (or machines) use before NCCL can start,
//! exercised with real threads, real files and real localhost sockets: every rank gets rank
//! 0's bytes; a missing, foreign, duplicate or stale rank is named in an error within the
//! wait, never a hang.

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};
use syncdrop::comm::rendezvous::{parse_id_file, Id, Rendezvous};

fn id(seed: u8) -> Id {
    let mut id = [0u8; 128];
    for (i, b) in id.iter_mut().enumerate() {
        *b = seed.wrapping_add((i as u8).wrapping_mul(37));
    }
    id
}

/// A localhost port nobody listens on right now.
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// Runs ranks `ranks` of a world of `world` on threads (rank 0 makes `id(seed)`), each
/// started `stagger` after the previous one; returns each rank's outcome in order.
fn run(
    rv: &Rendezvous,
    ranks: &[usize],
    world: usize,
    wait: Duration,
    stagger: Duration,
) -> Vec<Result<Id, String>> {
    let hs: Vec<_> = ranks
        .iter()
        .map(|&r| {
            let rv = rv.clone();
            thread::sleep(stagger);
            thread::spawn(move || {
                rv.exchange(r, world, wait, || Ok(id(99)))
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn every_rank_gets_rank_0s_id_in_process_through_a_file_and_over_tcp() {
    let dir = std::env::temp_dir().join(format!("syncdrop-rdv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("id");
    for (rv, world) in [
        (Rendezvous::in_process(), 4),
        (Rendezvous::File(file.clone()), 3),
        (Rendezvous::Tcp(free_addr()), 8),
        (Rendezvous::Tcp(free_addr()), 2),
        (Rendezvous::Tcp(free_addr()), 1),
    ] {
        // peers first, rank 0 last: they wait for it (or retry connecting until it listens)
        let ranks: Vec<usize> = (0..world).rev().collect();
        let got = run(
            &rv,
            &ranks,
            world,
            Duration::from_secs(20),
            Duration::from_millis(30),
        );
        for (r, g) in ranks.iter().zip(&got) {
            assert_eq!(g.as_ref().unwrap(), &id(99), "{rv:?} rank {r}");
        }
        rv.finish(0);
    }
    assert!(
        !file.exists(),
        "rank 0 removes the id file once everyone has joined"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_rank_is_named_at_rank_0_and_the_others_time_out_instead_of_hanging() {
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr.clone());
    let wait = Duration::from_millis(1500);
    let t0 = Instant::now();
    // world 4 without rank 2; the peers would wait longer than rank 0, so they hear its
    // reason rather than time out themselves
    let peers: Vec<_> = [1usize, 3]
        .into_iter()
        .map(|r| {
            let rv = rv.clone();
            thread::spawn(move || {
                rv.exchange(r, 4, Duration::from_secs(20), || unreachable!())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let e0 = rv
        .exchange(0, 4, wait, || Ok(id(1)))
        .unwrap_err()
        .to_string();
    assert!(e0.contains("[2]") && e0.contains("did not connect"), "{e0}");
    for p in peers {
        let e = p.join().unwrap().unwrap_err();
        assert!(e.contains("rank 0 refused") && e.contains("[2]"), "{e}");
    }
    let took = t0.elapsed();
    assert!(took < wait + Duration::from_secs(3), "took {took:?}");
    // a peer whose own wait ends first says so
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr);
    let r0 = {
        let rv = rv.clone();
        thread::spawn(move || rv.exchange(0, 3, Duration::from_secs(3), || Ok(id(1))))
    };
    let e = rv
        .exchange(1, 3, Duration::from_millis(700), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("got no id") || e.contains("could not connect"),
        "{e}"
    );
    assert!(r0.join().unwrap().is_err());

    // no rank 0 at all: a peer gives up connecting within its wait
    let t0 = Instant::now();
    let e = Rendezvous::Tcp(free_addr())
        .exchange(1, 2, Duration::from_millis(400), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("could not connect"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    // the same through a file and in process
    let f = std::env::temp_dir().join(format!("syncdrop-rdv-none-{}", std::process::id()));
    for rv in [Rendezvous::File(f), Rendezvous::in_process()] {
        let e = rv
            .exchange(1, 2, Duration::from_millis(200), || unreachable!())
            .unwrap_err()
            .to_string();
        assert!(e.contains("id"), "{rv:?}: {e}");
    }
}

#[test]
fn ranks_of_another_world_duplicates_and_strangers_are_refused_with_a_reason() {
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr.clone());
    let wait = Duration::from_secs(20);
    let r0 = {
        let rv = rv.clone();
        thread::spawn(move || rv.exchange(0, 3, wait, || Ok(id(7))))
    };
    // a stranger that says nothing useful, then closes
    let stranger = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(mut s) => {
                use std::io::{Read, Write};
                s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                break answer;
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(
        stranger.starts_with("error: not a syncdrop rank"),
        "{stranger}"
    );
    // a rank of a world of 4 (another run, or a wrong --tp)
    let e = rv
        .exchange(1, 4, wait, || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("world of 4") && e.contains("rank 0's is 3"),
        "{e}"
    );
    // rank 2 connects and dies before the id comes (a crash, a restart by the launcher):
    // its restarted process later takes the dead connection's place
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        writeln!(s, "syncdrop-rdv v1 world=3 rank=2").unwrap();
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(100));
    // rank 1 arrives, then a second rank 1 is refused, then rank 2 completes the world
    let one = {
        let rv = rv.clone();
        thread::spawn(move || rv.exchange(1, 3, wait, || unreachable!()))
    };
    thread::sleep(Duration::from_millis(300));
    let e = rv
        .exchange(1, 3, wait, || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1 connected twice"), "{e}");
    let two = rv.exchange(2, 3, wait, || unreachable!()).unwrap();
    assert_eq!(two, id(7));
    assert_eq!(one.join().unwrap().unwrap(), id(7));
    assert_eq!(r0.join().unwrap().unwrap(), id(7));

    // a rank outside the world is refused before anything is attempted
    let e = rv
        .exchange(3, 3, wait, || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a rank"), "{e}");
    // an address that is not host:port
    let e = Rendezvous::Tcp("no-port-here".into())
        .exchange(1, 2, wait, || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("host:port"), "{e}");
}

#[test]
fn two_rank_0s_on_one_address_cannot_both_listen() {
    let addr = free_addr();
    let busy = TcpListener::bind(&addr).unwrap();
    let e = Rendezvous::Tcp(addr)
        .exchange(0, 2, Duration::from_secs(1), || Ok(id(1)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot listen"), "{e}");
    drop(busy);
}

/// The id file's checks: complete, incomplete, foreign and stale (another world size) files.
#[test]
fn id_files_are_checked_before_use() {
    let p = std::path::Path::new("/tmp/id");
    let mut good = b"syncdrop-nccl-id v1 world=4\n".to_vec();
    good.extend((0..128u8).map(|i| i.wrapping_mul(7)));
    let got = parse_id_file(&good, 4, p).unwrap().expect("complete");
    assert_eq!(got[3], 21);
    assert!(parse_id_file(&good[..good.len() - 1], 4, p)
        .unwrap()
        .is_none());
    assert!(parse_id_file(b"syncdrop-nccl", 4, p).unwrap().is_none());
    let stale = parse_id_file(&good, 2, p).unwrap_err().to_string();
    assert!(stale.contains("another world size"), "{stale}");
    let foreign = parse_id_file(b"hello\nworld", 4, p)
        .unwrap_err()
        .to_string();
    assert!(foreign.contains("not a syncdrop NCCL id file"), "{foreign}");

    // a stale file of another world size is waited out (rank 0 replaces it when it starts)
    // and named when the wait ends
    let f = std::env::temp_dir().join(format!("syncdrop-rdv-stale-{}", std::process::id()));
    std::fs::write(&f, &good).unwrap();
    let e = Rendezvous::File(f.clone())
        .exchange(1, 2, Duration::from_millis(300), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("another world size"), "{e}");
    let reader = {
        let rv = Rendezvous::File(f.clone());
        thread::spawn(move || rv.exchange(1, 2, Duration::from_secs(20), || unreachable!()))
    };
    thread::sleep(Duration::from_millis(200));
    let rv = Rendezvous::File(f.clone());
    assert_eq!(
        rv.exchange(0, 2, Duration::from_secs(1), || Ok(id(5)))
            .unwrap(),
        id(5)
    );
    assert_eq!(reader.join().unwrap().unwrap(), id(5));
    rv.finish(0);
    assert!(!f.exists());
}
