//! The id rendezvous that ranks in separate processes (or machines) use before NCCL can start,
//! exercised with real threads, real files and real localhost sockets: every rank gets rank
//! 0's bytes; a missing, foreign, duplicate or stale rank is named in an error within the
//! wait, never a hang.

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};
use syncdrop::comm::rendezvous::{parse_id_file, Id, Rendezvous, Terms};

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
                rv.exchange(r, world, wait, &Terms::new(), || Ok(id(99)))
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
                rv.exchange(
                    r,
                    4,
                    Duration::from_secs(20),
                    &Terms::new(),
                    || unreachable!(),
                )
                .map_err(|e| e.to_string())
            })
        })
        .collect();
    let e0 = rv
        .exchange(0, 4, wait, &Terms::new(), || Ok(id(1)))
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
        thread::spawn(move || {
            rv.exchange(0, 3, Duration::from_secs(3), &Terms::new(), || Ok(id(1)))
        })
    };
    let e = rv
        .exchange(
            1,
            3,
            Duration::from_millis(700),
            &Terms::new(),
            || unreachable!(),
        )
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
        .exchange(
            1,
            2,
            Duration::from_millis(400),
            &Terms::new(),
            || unreachable!(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("could not connect"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    // the same through a file and in process
    let f = std::env::temp_dir().join(format!("syncdrop-rdv-none-{}", std::process::id()));
    for rv in [Rendezvous::File(f), Rendezvous::in_process()] {
        let e = rv
            .exchange(
                1,
                2,
                Duration::from_millis(200),
                &Terms::new(),
                || unreachable!(),
            )
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
        thread::spawn(move || rv.exchange(0, 3, wait, &Terms::new(), || Ok(id(7))))
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
        .exchange(1, 4, wait, &Terms::new(), || unreachable!())
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
        writeln!(
            s,
            "syncdrop-rdv v2 world=3 rank=2 terms: syncdrop={}",
            env!("CARGO_PKG_VERSION")
        )
        .unwrap();
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(100));
    // rank 1 arrives, then a second rank 1 is refused, then rank 2 completes the world
    let one = {
        let rv = rv.clone();
        thread::spawn(move || rv.exchange(1, 3, wait, &Terms::new(), || unreachable!()))
    };
    thread::sleep(Duration::from_millis(300));
    let e = rv
        .exchange(1, 3, wait, &Terms::new(), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1 connected twice"), "{e}");
    let two = rv
        .exchange(2, 3, wait, &Terms::new(), || unreachable!())
        .unwrap();
    assert_eq!(two, id(7));
    assert_eq!(one.join().unwrap().unwrap(), id(7));
    assert_eq!(r0.join().unwrap().unwrap(), id(7));

    // a rank outside the world is refused before anything is attempted
    let e = rv
        .exchange(3, 3, wait, &Terms::new(), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a rank"), "{e}");
    // an address that is not host:port
    let e = Rendezvous::Tcp("no-port-here".into())
        .exchange(1, 2, wait, &Terms::new(), || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("host:port"), "{e}");
}

#[test]
fn two_rank_0s_on_one_address_cannot_both_listen() {
    let addr = free_addr();
    let busy = TcpListener::bind(&addr).unwrap();
    let e = Rendezvous::Tcp(addr)
        .exchange(0, 2, Duration::from_secs(1), &Terms::new(), || Ok(id(1)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot listen"), "{e}");
    drop(busy);
}

/// The id file's checks: complete, incomplete, foreign, another version, another world size,
/// other options.
#[test]
fn id_files_are_checked_before_use() {
    let p = std::path::Path::new("/tmp/id");
    let mine = Terms::new().with("graphs", "on").with("spd", "layers:1,2");
    let file = |world: usize, terms: &str| {
        let mut b = format!(
            "syncdrop-nccl-id v2 world={world}\nterms: syncdrop={} {terms}\n",
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes();
        b.extend((0..128u8).map(|i| i.wrapping_mul(7)));
        b
    };
    let good = file(4, "graphs=on spd=layers:1,2");
    let got = parse_id_file(&good, 4, &mine, p)
        .unwrap()
        .expect("complete");
    assert_eq!(got[3], 21);
    // the same pairs in another order agree
    let reordered = file(4, "spd=layers:1,2 graphs=on");
    assert!(parse_id_file(&reordered, 4, &mine, p).unwrap().is_some());
    assert!(parse_id_file(&good[..good.len() - 1], 4, &mine, p)
        .unwrap()
        .is_none());
    assert!(parse_id_file(b"syncdrop-nccl", 4, &mine, p)
        .unwrap()
        .is_none());
    let stale = parse_id_file(&good, 2, &mine, p).unwrap_err().to_string();
    assert!(stale.contains("another world size"), "{stale}");
    let foreign = parse_id_file(b"hello\nworld", 4, &mine, p)
        .unwrap_err()
        .to_string();
    assert!(foreign.contains("not a syncdrop NCCL id file"), "{foreign}");
    let old = parse_id_file(b"syncdrop-nccl-id v1 world=4\nxx", 4, &mine, p)
        .unwrap_err()
        .to_string();
    assert!(old.contains("another syncdrop version"), "{old}");
    let other = parse_id_file(&file(4, "graphs=off spd=layers:1,2"), 4, &mine, p)
        .unwrap_err()
        .to_string();
    assert!(
        other.contains("other options") && other.contains("graphs (this rank: on, rank 0: off)"),
        "{other}"
    );
    assert!(
        !other.contains("spd ("),
        "only the difference is named: {other}"
    );

    // a stale file of another world size is waited out (rank 0 replaces it when it starts)
    // and named when the wait ends
    let f = std::env::temp_dir().join(format!("syncdrop-rdv-stale-{}", std::process::id()));
    std::fs::write(&f, &good).unwrap();
    let e = Rendezvous::File(f.clone())
        .exchange(1, 2, Duration::from_millis(300), &mine, || unreachable!())
        .unwrap_err()
        .to_string();
    assert!(e.contains("another world size"), "{e}");
    let reader = {
        let (rv, mine) = (Rendezvous::File(f.clone()), mine.clone());
        thread::spawn(move || rv.exchange(1, 2, Duration::from_secs(20), &mine, || unreachable!()))
    };
    thread::sleep(Duration::from_millis(200));
    let rv = Rendezvous::File(f.clone());
    assert_eq!(
        rv.exchange(0, 2, Duration::from_secs(1), &mine, || Ok(id(5)))
            .unwrap(),
        id(5)
    );
    assert_eq!(reader.join().unwrap().unwrap(), id(5));
    rv.finish(0);
    assert!(!f.exists());
}

/// Ranks started separately can be started differently. One whose options differ from rank
/// 0's (SPD plan, ISO mode, CUDA graphs, ...) would pair its collectives with the wrong ones:
/// the rendezvous stops it and rank 0 at once, naming each difference, over TCP and through
/// a file written since the rank started (an older file may be stale and is waited out).
#[test]
fn a_rank_started_with_other_options_stops_the_run_naming_the_difference() {
    let base = Terms::new()
        .with("model", "SmolLM2 135M.gguf")
        .with("graphs", "on")
        .with("spd", "none");
    let odd = base.clone().with("graphs", "off").with("iso", "Auto");
    let wait = Duration::from_secs(20);
    let t0 = Instant::now();

    // tcp: ranks 1 and 3 agree with rank 0, rank 2 does not
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr);
    let spawn = |r: usize, t: &Terms| {
        let (rv, t) = (rv.clone(), t.clone());
        thread::spawn(move || {
            rv.exchange(r, 4, wait, &t, || Ok(id(3)))
                .map_err(|e| e.to_string())
        })
    };
    let r0 = spawn(0, &base);
    let r1 = spawn(1, &base);
    thread::sleep(Duration::from_millis(300));
    let r2 = spawn(2, &odd);
    let e0 = r0.join().unwrap().unwrap_err();
    assert!(
        e0.contains("rank 2 was started with other options")
            && e0.contains("graphs (rank 2: off, rank 0: on)")
            && e0.contains("iso (rank 2: Auto, rank 0: (unset))"),
        "{e0}"
    );
    assert!(!e0.contains("model ("), "only differences are named: {e0}");
    let e2 = r2.join().unwrap().unwrap_err();
    assert!(
        e2.contains("rank 0 refused rank 2") && e2.contains("graphs"),
        "{e2}"
    );
    // a rank that agreed hears why the run stopped
    let e1 = r1.join().unwrap().unwrap_err();
    assert!(e1.contains("rank 2 was started with other options"), "{e1}");
    // values with spaces and '=' survive the line
    let spaced = Rendezvous::Tcp(free_addr());
    let t = base.clone().with("spd", "plan: a=b %c");
    let (a, b) = (spawn_one(&spaced, 0, &t), spawn_one(&spaced, 1, &t));
    assert_eq!(a.join().unwrap().unwrap(), id(3));
    assert_eq!(b.join().unwrap().unwrap(), id(3));

    // file: a reader started before rank 0 wrote its file stops at once
    let f = std::env::temp_dir().join(format!("syncdrop-rdv-terms-{}", std::process::id()));
    let _ = std::fs::remove_file(&f);
    let reader = {
        let (rv, odd) = (Rendezvous::File(f.clone()), odd.clone());
        thread::spawn(move || {
            let t = Instant::now();
            let r = rv.exchange(1, 2, wait, &odd, || unreachable!());
            (r.map_err(|e| e.to_string()), t.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(300));
    let rv = Rendezvous::File(f.clone());
    rv.exchange(0, 2, wait, &base, || Ok(id(4))).unwrap();
    let (e, took) = reader.join().unwrap();
    let e = e.unwrap_err();
    assert!(
        e.contains("rank 1") && e.contains("graphs (this rank: off, rank 0: on)"),
        "{e}"
    );
    assert!(
        took < Duration::from_secs(5),
        "stopped at once, took {took:?}"
    );
    rv.finish(0);
    assert!(t0.elapsed() < Duration::from_secs(10), "no wait ran out");
}

fn spawn_one(rv: &Rendezvous, r: usize, t: &Terms) -> thread::JoinHandle<syncdrop::Result<Id>> {
    let (rv, t) = (rv.clone(), t.clone());
    thread::spawn(move || rv.exchange(r, 2, Duration::from_secs(20), &t, || Ok(id(3))))
}

#[test]
fn terms_round_trip_and_compare_by_key() {
    let t = Terms::new()
        .with("a", "x y")
        .with("b=c", "100%")
        .with("nl", "1\n2")
        .with("a", "replaced");
    let line = t.encode();
    assert!(!line.contains('\n'), "{line}");
    assert_eq!(Terms::decode(&line), t);
    assert_eq!(t.get("a"), Some("replaced"));
    assert_eq!(t.get("b=c"), Some("100%25"));
    let u = Terms::new()
        .with("nl", "1\n2")
        .with("b=c", "100%")
        .with("a", "replaced");
    assert!(
        t.differences("me", &u, "them").is_empty(),
        "order does not matter"
    );
    let v = u.clone().with("a", "other").with("extra", 1);
    assert_eq!(
        t.differences("me", &v, "them"),
        vec![
            "a (me: replaced, them: other)".to_string(),
            "extra (me: (unset), them: 1)".to_string()
        ]
    );
    // a hello from an older syncdrop is named as such
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr.clone());
    let r0 = {
        let rv = rv.clone();
        thread::spawn(move || {
            rv.exchange(0, 2, Duration::from_secs(1), &Terms::new(), || Ok(id(1)))
        })
    };
    let answer = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(mut s) => {
                use std::io::{Read, Write};
                writeln!(s, "syncdrop-rdv v1 world=2 rank=1").unwrap();
                let mut a = String::new();
                let _ = s.read_to_string(&mut a);
                break a;
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(answer.contains("another syncdrop version"), "{answer}");
    let e = r0.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("another syncdrop version"), "{e}");
}

/// What an engine brings to the rendezvous: every option that changes the collectives its
/// rank issues, and the caller's own terms; options that do not (threads) stay out.
#[test]
fn an_engines_terms_name_what_changes_its_collectives() {
    use syncdrop::engine::{Engine, EngineOptions};
    use syncdrop::layout::TpLayout;
    use syncdrop::synthetic::SyntheticModel;
    use syncdrop::weights::ModelFiles;
    let files = ModelFiles::Synthetic(SyntheticModel::parse("llama2-7b:layers=2").unwrap());
    let cfg = files.config().unwrap();
    let layout = TpLayout::new(&cfg, 4).unwrap();
    let base = EngineOptions {
        tp: 4,
        threads: 8,
        ..Default::default()
    };
    let terms = |o: &EngineOptions, l: &TpLayout| Engine::rank_terms(&files, &cfg, l, o);
    let t = terms(&base, &layout);
    for key in [
        "model",
        "shape",
        "shards",
        "wire",
        "graphs",
        "SYNCDROP_ALLREDUCE",
    ] {
        assert!(t.get(key).is_some(), "{key} in {t:?}");
    }
    let same = EngineOptions {
        threads: 2,
        capacity: 99,
        ..base.clone()
    };
    assert!(t.differences("a", &terms(&same, &layout), "b").is_empty());
    let changed = EngineOptions {
        cuda_graphs: false,
        wire: syncdrop::comm::Wire::Bf16,
        rank_terms: Terms::new().with("spd", "layers:3"),
        ..base.clone()
    };
    let d = t
        .differences("a", &terms(&changed, &layout), "b")
        .join("; ");
    for key in [
        "graphs (a: on, b: off)",
        "wire (a: f32, b: bf16)",
        "spd (a: (unset)",
    ] {
        assert!(d.contains(key), "{key} in {d}");
    }
    // a permuted layout (EngineOptions::layout) is another partition
    let mut permuted = layout.clone();
    permuted.ranks[0].q_heads.swap(0, 1);
    let d = t.differences("a", &terms(&base, &permuted), "b").join("; ");
    assert!(d.starts_with("shards ("), "{d}");
    // another seed is another model
    let other = ModelFiles::Synthetic(SyntheticModel::parse("llama2-7b:layers=2,seed=9").unwrap());
    let d = t
        .differences("a", &Engine::rank_terms(&other, &cfg, &layout, &base), "b")
        .join("; ");
    assert!(d.starts_with("model ("), "{d}");
}
