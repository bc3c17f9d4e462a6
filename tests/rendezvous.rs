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

/// Connects to `addr`, retrying while rank 0 is not listening yet (10 s at most).
fn connect(addr: &str) -> std::net::TcpStream {
    let t0 = Instant::now();
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => panic!("connect {addr}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The error a peer rank (`rank` > 0) of `world` gets from `rv`.
fn peer_err(rv: &Rendezvous, rank: usize, world: usize, wait: Duration, terms: &Terms) -> String {
    rv.exchange(rank, world, wait, terms, || unreachable!())
        .unwrap_err()
        .to_string()
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
        for r in 0..world {
            rv.finish(r, world);
        }
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
        assert!(
            e.contains("rank 0 stopped the run") && e.contains("[2]"),
            "{e}"
        );
    }
    let took = t0.elapsed();
    // its wait, then 2 s in which rank 0 still answers late ranks with the reason
    assert!(took < wait + Duration::from_secs(5), "took {took:?}");
    // a peer whose own wait ends first says so
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr);
    let r0 = {
        let rv = rv.clone();
        thread::spawn(move || {
            rv.exchange(0, 3, Duration::from_secs(3), &Terms::new(), || Ok(id(1)))
        })
    };
    let e = peer_err(&rv, 1, 3, Duration::from_millis(700), &Terms::new());
    assert!(
        e.contains("got no id") || e.contains("could not connect"),
        "{e}"
    );
    assert!(r0.join().unwrap().is_err());

    // no rank 0 at all: a peer gives up connecting within its wait
    let t0 = Instant::now();
    let e = peer_err(
        &Rendezvous::Tcp(free_addr()),
        1,
        2,
        Duration::from_millis(400),
        &Terms::new(),
    );
    assert!(e.contains("could not connect"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3));

    // the same through a file and in process
    let f = std::env::temp_dir().join(format!("syncdrop-rdv-none-{}", std::process::id()));
    for rv in [Rendezvous::File(f), Rendezvous::in_process()] {
        let e = peer_err(&rv, 1, 2, Duration::from_millis(200), &Terms::new());
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
    let stranger = {
        use std::io::{Read, Write};
        let mut s = connect(&addr);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    assert!(
        stranger.starts_with("error: not a syncdrop rank"),
        "{stranger}"
    );
    // a rank of a world of 4 (another run, or a wrong --tp)
    let e = peer_err(&rv, 1, 4, wait, &Terms::new());
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
            syncdrop::BUILD
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
    thread::sleep(Duration::from_millis(1000));
    let e = peer_err(&rv, 1, 3, wait, &Terms::new());
    assert!(e.contains("rank 1 connected twice"), "{e}");
    let two = rv
        .exchange(2, 3, wait, &Terms::new(), || unreachable!())
        .unwrap();
    assert_eq!(two, id(7));
    assert_eq!(one.join().unwrap().unwrap(), id(7));
    assert_eq!(r0.join().unwrap().unwrap(), id(7));

    // a rank outside the world is refused before anything is attempted
    let e = peer_err(&rv, 3, 3, wait, &Terms::new());
    assert!(e.contains("not a rank"), "{e}");
    // an address that is not host:port
    let e = peer_err(
        &Rendezvous::Tcp("no-port-here".into()),
        1,
        2,
        wait,
        &Terms::new(),
    );
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
            syncdrop::BUILD
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
    rv.finish(0, 2);
    rv.finish(1, 2);
    assert!(!f.exists());

    // a stale file of the same world and options (a crashed run's) is answered but never
    // used: the reader takes the id of the rank 0 that replaces it, and rank 0 clears the
    // stale answer first
    let same = file(2, "graphs=on spd=layers:1,2");
    std::fs::write(&f, &same).unwrap();
    let reader = {
        let (rv, mine) = (Rendezvous::File(f.clone()), mine.clone());
        thread::spawn(move || rv.exchange(1, 2, Duration::from_secs(20), &mine, || unreachable!()))
    };
    let ack = std::path::PathBuf::from(format!("{}.ack-1", f.display()));
    wait_for(&ack); // the reader answers the stale file
    let rv = Rendezvous::File(f.clone());
    rv.exchange(0, 2, Duration::from_secs(10), &mine, || Ok(id(6)))
        .unwrap();
    let got = reader.join().unwrap().unwrap();
    assert_eq!(got, id(6), "not the stale id");
    rv.finish(0, 2);
    rv.finish(1, 2);
    let dir = f.parent().unwrap();
    let name = f.file_name().unwrap().to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&name))
        .collect();
    // only the verdict stays (for ranks still to read it), and it names an id with no file
    assert_eq!(
        left,
        vec![format!("{name}.go")],
        "finish leaves only the verdict"
    );
    assert!(!f.exists());

    // a missing rank is named at rank 0 and the others hear it, as over TCP
    let one = {
        let (rv, mine) = (Rendezvous::File(f.clone()), mine.clone());
        thread::spawn(move || rv.exchange(1, 3, Duration::from_secs(20), &mine, || unreachable!()))
    };
    let e0 = rv
        .exchange(0, 3, Duration::from_secs(4), &mine, || Ok(id(8)))
        .unwrap_err()
        .to_string();
    assert!(e0.contains("[2]") && e0.contains("did not answer"), "{e0}");
    let e1 = one.join().unwrap().unwrap_err().to_string();
    assert!(
        e1.contains("rank 0 stopped the run") && e1.contains("[2]"),
        "{e1}"
    );
    assert!(!f.exists(), "a stopped rank 0 removes its id");
    let _ = std::fs::remove_file(format!("{}.go", f.display()));
}

/// Ranks started separately can be started differently. One whose options differ from rank
/// 0's (SPD plan, ISO mode, CUDA graphs, ...) would pair its collectives with the wrong ones:
/// the rendezvous stops rank 0 and every rank within seconds, naming each difference, over
/// TCP and through a file, whichever rank starts first.
#[test]
fn a_rank_started_with_other_options_stops_the_run_naming_the_difference() {
    use std::io::{Read, Write};
    let base = Terms::new()
        .with("model", "SmolLM2 135M.gguf")
        .with("graphs", "on")
        .with("spd", "none");
    let odd = base.clone().with("graphs", "off").with("iso", "Auto");
    let wait = Duration::from_secs(20);
    let t0 = Instant::now();

    // tcp: rank 1 agrees with rank 0 (a hand-written client, so that it is surely in the
    // accept queue first), rank 2 does not
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr.clone());
    let r0 = {
        let (rv, base) = (rv.clone(), base.clone());
        thread::spawn(move || {
            rv.exchange(0, 4, wait, &base, || Ok(id(3)))
                .map_err(|e| e.to_string())
        })
    };
    let mut one = connect(&addr);
    writeln!(
        one,
        "syncdrop-rdv v2 world=4 rank=1 terms: syncdrop={} {}",
        syncdrop::BUILD,
        base.encode()
    )
    .unwrap();
    let e2 = peer_err(&rv, 2, 4, wait, &odd);
    // a rank that arrives after the stop still hears why, instead of retrying for its wait
    let late = Instant::now();
    let e3 = peer_err(&rv, 3, 4, wait, &base);
    assert!(
        e3.contains("rank 0 stopped the run: rank 2 was started with other options"),
        "{e3}"
    );
    assert!(
        late.elapsed() < Duration::from_secs(3),
        "{:?}",
        late.elapsed()
    );
    let e0 = r0.join().unwrap().unwrap_err();
    assert!(
        e0.contains("rank 2 was started with other options")
            && e0.contains("graphs (rank 2: off, rank 0: on)")
            && e0.contains("iso (rank 2: Auto, rank 0: (unset))"),
        "{e0}"
    );
    assert!(!e0.contains("model ("), "only differences are named: {e0}");
    assert!(
        e2.contains("rank 2: rank 0 stopped the run") && e2.contains("graphs"),
        "{e2}"
    );
    // the rank that agreed hears why the run stopped
    let mut heard = String::new();
    one.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = one.read_to_string(&mut heard);
    assert!(
        heard.starts_with("error: rank 2 was started with other options"),
        "{heard}"
    );

    // file: rank 0 reads the refusal and stops, and so does every rank, whoever starts first
    let f = std::env::temp_dir().join(format!("syncdrop-rdv-terms-{}", std::process::id()));
    let file_run = |peer_first: bool| {
        let rv = Rendezvous::File(f.clone());
        let start = |r: usize, t: &Terms| {
            let (rv, t) = (rv.clone(), t.clone());
            thread::spawn(move || {
                rv.exchange(r, 3, wait, &t, || Ok(id(4)))
                    .map_err(|e| e.to_string())
            })
        };
        let (zero, one, two);
        if peer_first {
            two = start(2, &odd);
            one = start(1, &base);
            thread::sleep(Duration::from_millis(200));
            zero = start(0, &base);
        } else {
            zero = start(0, &base);
            thread::sleep(Duration::from_millis(200));
            one = start(1, &base);
            two = start(2, &odd);
        }
        let out = [zero, one, two].map(|h| h.join().unwrap().unwrap_err());
        let _ = std::fs::remove_file(format!("{}.go", f.display()));
        out
    };
    for peer_first in [true, false] {
        let [e0, e1, e2] = file_run(peer_first);
        assert!(
            e0.contains("rank 2 refused rank 0's id")
                && e0.contains("graphs (rank 2: off, rank 0: on)")
                && e0.contains("iso (rank 2: Auto, rank 0: (unset))"),
            "peer first {peer_first}: {e0}"
        );
        for e in [&e1, &e2] {
            assert!(
                e.contains("rank 0 stopped the run: rank 2 refused"),
                "peer first {peer_first}: {e}"
            );
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "no wait ran out: {:?}",
        t0.elapsed()
    );
}

/// A rank built from other sources (same version, another source id) is refused like one
/// started with other options: its collectives may differ.
#[test]
fn a_rank_built_from_other_sources_is_refused() {
    use std::io::{Read, Write};
    let version = env!("CARGO_PKG_VERSION");
    let id_part = syncdrop::BUILD
        .strip_prefix(&format!("{version}+src."))
        .unwrap_or_else(|| panic!("BUILD is version+src.<id>: {}", syncdrop::BUILD));
    assert!(
        id_part.len() == 12 && id_part.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id_part}"
    );
    let other = format!("{version}+src.{}", "0".repeat(12));
    assert_ne!(other, syncdrop::BUILD);
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr.clone());
    let r0 = {
        let rv = rv.clone();
        thread::spawn(move || {
            rv.exchange(0, 2, Duration::from_secs(20), &Terms::new(), || Ok(id(5)))
                .map_err(|e| e.to_string())
        })
    };
    let mut one = connect(&addr);
    writeln!(
        one,
        "syncdrop-rdv v2 world=2 rank=1 terms: syncdrop={other}"
    )
    .unwrap();
    let mut heard = String::new();
    one.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = one.read_to_string(&mut heard);
    let e0 = r0.join().unwrap().unwrap_err();
    let named = format!("syncdrop (rank 1: {other}, rank 0: {})", syncdrop::BUILD);
    assert!(e0.contains(&named), "{e0}");
    assert!(
        heard.starts_with("error: ") && heard.contains(&named),
        "{heard}"
    );
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
    // a value that reads "(unset)" is not a missing key; differently escaped values differ
    let unset = Terms::new().with("k", "(unset)");
    assert_eq!(unset.differences("me", &Terms::new(), "them").len(), 1);
    let (sp, us) = (Terms::new().with("k", "a b"), Terms::new().with("k", "a_b"));
    assert_eq!(
        sp.differences("me", &us, "them"),
        vec!["k (me: a b, them: a_b)".to_string()],
        "values are shown decoded"
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
    let answer = {
        use std::io::{Read, Write};
        let mut s = connect(&addr);
        writeln!(s, "syncdrop-rdv v1 world=2 rank=1").unwrap();
        let mut a = String::new();
        let _ = s.read_to_string(&mut a);
        a
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
    // the same model however its spec is written; another seed is another model
    let spelled =
        ModelFiles::Synthetic(SyntheticModel::parse("llama2-7b:seed=0,layers=2").unwrap());
    assert!(t
        .differences(
            "a",
            &Engine::rank_terms(&spelled, &cfg, &layout, &base),
            "b"
        )
        .is_empty());
    let other = ModelFiles::Synthetic(SyntheticModel::parse("llama2-7b:layers=2,seed=9").unwrap());
    let d = t
        .differences("a", &Engine::rank_terms(&other, &cfg, &layout, &base), "b")
        .join("; ");
    assert!(d.starts_with("model ("), "{d}");
}

/// The file handshake's loose ends: what a crash after the verdict leaves is never used by a
/// later run; a rank that gave up after answering is not counted; a rank of another world
/// size is heard; an over-long TCP hello is named.
#[test]
fn file_rendezvous_leftovers_quitters_and_outsiders() {
    let dir = std::env::temp_dir().join(format!("syncdrop-rdv-loose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("id");
    let t = Terms::new().with("graphs", "on");
    let spawn = |r: usize, world: usize, wait_ms: u64, seed: u8| {
        let (rv, t) = (Rendezvous::File(f.clone()), t.clone());
        thread::spawn(move || {
            rv.exchange(r, world, Duration::from_millis(wait_ms), &t, || {
                Ok(id(seed))
            })
            .map_err(|e| e.to_string())
        })
    };
    // a run that "crashes" right after its verdict (no finish): a later run's early peer
    // still gets the later rank 0's id
    let (a0, a1) = (spawn(0, 2, 5000, 1), spawn(1, 2, 5000, 0));
    assert_eq!(a0.join().unwrap().unwrap(), id(1));
    assert_eq!(a1.join().unwrap().unwrap(), id(1));
    Rendezvous::File(f.clone()).abandon();
    let peer = spawn(1, 2, 10_000, 0);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(spawn(0, 2, 10_000, 2).join().unwrap().unwrap(), id(2));
    assert_eq!(
        peer.join().unwrap().unwrap(),
        id(2),
        "not the crashed run's id"
    );
    Rendezvous::File(f.clone()).finish(0, 2);
    Rendezvous::File(f.clone()).finish(1, 2);

    // rank 1 answers, then gives up before rank 2 arrives: rank 0 names it, not NCCL later
    let zero = spawn(0, 3, 5000, 3);
    let one = spawn(1, 3, 1000, 0);
    let e1 = one.join().unwrap().unwrap_err();
    assert!(e1.contains("rank 0 did not confirm"), "{e1}");
    let two = spawn(2, 3, 10_000, 0);
    let e0 = zero.join().unwrap().unwrap_err();
    assert!(e0.contains("[1]") && e0.contains("did not answer"), "{e0}");
    let e2 = two.join().unwrap().unwrap_err();
    assert!(
        e2.contains("rank 0 stopped the run") && e2.contains("[1]"),
        "{e2}"
    );

    // a rank 3 of a world of 4 (a wrong --tp) answering a world of 2 stops it, named
    let zero = spawn(0, 2, 10_000, 4);
    let outsider = spawn(3, 4, 10_000, 0);
    let e0 = zero.join().unwrap().unwrap_err();
    assert!(
        e0.contains("a rank 3 answered, but the world is 2 ranks") && e0.contains("world size"),
        "{e0}"
    );
    let e3 = outsider.join().unwrap().unwrap_err();
    assert!(e3.contains("rank 0 stopped the run"), "{e3}");
    let _ = std::fs::remove_dir_all(&dir);

    // tcp: a hello longer than rank 0 reads is named, not taken for a stranger's
    let addr = free_addr();
    let rv = Rendezvous::Tcp(addr.clone());
    let r0 = {
        let rv = rv.clone();
        thread::spawn(move || {
            rv.exchange(0, 2, Duration::from_secs(5), &Terms::new(), || Ok(id(1)))
        })
    };
    let huge = Terms::new().with("x", "y".repeat(70_000));
    let _ = rv.exchange(1, 2, Duration::from_millis(1000), &huge, || unreachable!());
    let e = r0.join().unwrap().unwrap_err().to_string();
    assert!(e.contains("longer than 65536 bytes"), "{e}");
}

/// Waits (10 s at most) until `p` exists.
fn wait_for(p: &std::path::Path) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            p.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// One run per id file: a second rank 0 on a path that is being served (or whose ranks are
/// still starting NCCL) is refused, naming the first; an `error` verdict left by a rank 0
/// that died while stopping its run (its id file still there, its lock free) does not stop a
/// later run's early peer, while one whose rank 0 is alive or finished cleanly does.
#[test]
fn file_rendezvous_one_run_per_path_and_verdicts_of_dead_rank_0s() {
    use sha2::Digest;
    let dir = std::env::temp_dir().join(format!("syncdrop-rdv-lock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("id");
    let beside = |suffix: &str| dir.join(format!("id.{suffix}"));
    let t = Terms::new().with("graphs", "on");
    let spawn = |r: usize, wait_ms: u64, seed: u8| {
        let (rv, t) = (Rendezvous::File(f.clone()), t.clone());
        thread::spawn(move || {
            rv.exchange(r, 2, Duration::from_millis(wait_ms), &t, || Ok(id(seed)))
                .map_err(|e| e.to_string())
        })
    };
    let second_rank_0_refused = || {
        let t0 = Instant::now();
        let e = spawn(0, 10_000, 2).join().unwrap().unwrap_err();
        assert!(
            e.contains(&format!("another rank 0 (pid {} on ", std::process::id()))
                && e.contains("two runs cannot share one id file"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    };

    // a second rank 0 while the first one waits for its peer, and while its ranks start NCCL
    let first = spawn(0, 10_000, 1);
    wait_for(&f);
    second_rank_0_refused();
    assert_eq!(spawn(1, 10_000, 0).join().unwrap().unwrap(), id(1));
    assert_eq!(first.join().unwrap().unwrap(), id(1), "untouched by it");
    second_rank_0_refused();
    Rendezvous::File(f.clone()).finish(0, 2);
    assert!(!beside("lock").exists(), "finish removes the lock file");
    Rendezvous::File(f.clone()).finish(1, 2);
    assert!(!beside("lock-1").exists(), "and a peer's finish its claim");

    // what a rank 0 killed during its stop leaves: its id file, an `error` verdict for it,
    // and its lock file, unlocked
    let dead = id(7);
    let tag: String = sha2::Sha256::digest(dead)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let leave_dead_run = || {
        let mut bytes = format!(
            "syncdrop-nccl-id v2 world=2\nterms: syncdrop={} graphs=on\n",
            syncdrop::BUILD
        )
        .into_bytes();
        bytes.extend_from_slice(&dead);
        std::fs::write(&f, bytes).unwrap();
        std::fs::write(
            beside("go"),
            format!("error {tag} rank 1 refused: old reason\n"),
        )
        .unwrap();
        std::fs::write(beside("lock"), "pid 1 on gone\n").unwrap();
    };
    // a later run's peer, started first, waits for the later rank 0 and gets its id
    leave_dead_run();
    let peer = spawn(1, 10_000, 0);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(spawn(0, 10_000, 3).join().unwrap().unwrap(), id(3));
    assert_eq!(
        peer.join().unwrap().unwrap(),
        id(3),
        "not stopped by the dead run's verdict"
    );
    Rendezvous::File(f.clone()).finish(0, 2);
    Rendezvous::File(f.clone()).finish(1, 2);
    // with no later rank 0, the peer's own wait ends, naming what it found
    leave_dead_run();
    let e = spawn(1, 3000, 0).join().unwrap().unwrap_err();
    assert!(
        e.contains("rank 0 did not confirm")
            && e.contains(
                "left by a rank 0 that died while stopping its run (rank 1 refused: old reason)"
            ),
        "{e}"
    );

    // the same files while a rank 0 holds the lock (in its stop grace, or clearing the path
    // as it starts): the peer looks again instead of failing; once the id is gone (a clean
    // stop) it believes the verdict at once
    leave_dead_run();
    let lock = std::fs::File::open(beside("lock")).unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor `lock` owns.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    }
    let peer = spawn(1, 10_000, 0);
    thread::sleep(Duration::from_millis(2500)); // past ORPHAN_AFTER: the lock counts
    assert!(!peer.is_finished(), "a held lock means: look again");
    std::fs::remove_file(&f).unwrap();
    let t0 = Instant::now();
    let e = peer.join().unwrap().unwrap_err();
    assert!(
        e.contains("rank 0 stopped the run: rank 1 refused: old reason"),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    drop(lock);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One process per rank: a second process answering as a rank that one already holds (a
/// peer of an earlier run that outlived its rank 0, say) is refused at once, naming the
/// first; it would otherwise answer into the same file and both would take the id. The
/// claim ends with the first's `finish`, or with its failure.
#[test]
fn file_rendezvous_one_process_per_rank() {
    let dir = std::env::temp_dir().join(format!("syncdrop-rdv-claim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("id");
    let t = Terms::new().with("graphs", "on");
    let spawn = |r: usize, wait_ms: u64, seed: u8| {
        let (rv, t) = (Rendezvous::File(f.clone()), t.clone());
        thread::spawn(move || {
            rv.exchange(r, 3, Duration::from_millis(wait_ms), &t, || Ok(id(seed)))
                .map_err(|e| e.to_string())
        })
    };
    let claim = dir.join("id.lock-1");
    // the first rank 1 waits for a rank 0; a second one is refused within a second
    let first = spawn(1, 10_000, 0);
    wait_for(&claim);
    let t0 = Instant::now();
    let e = spawn(1, 10_000, 0).join().unwrap().unwrap_err();
    assert!(
        e.contains(&format!(
            "rank 1 is already taken on this file by another process (pid {} on ",
            std::process::id()
        )),
        "{e}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // the run goes on with the first, untouched
    let (zero, two) = (spawn(0, 10_000, 4), spawn(2, 10_000, 0));
    for h in [first, zero, two] {
        assert_eq!(h.join().unwrap().unwrap(), id(4));
    }
    // still claimed until finish (its run is starting NCCL)
    let e = spawn(1, 500, 0).join().unwrap().unwrap_err();
    assert!(e.contains("rank 1 is already taken"), "{e}");
    let rv = Rendezvous::File(f.clone());
    for r in 0..3 {
        rv.finish(r, 3);
    }
    assert!(!claim.exists(), "finish removes the claim");
    // a rank that fails lets go of its claim: the next process may take the rank
    let e = spawn(1, 300, 0).join().unwrap().unwrap_err();
    assert!(e.contains("no complete id") || e.contains("no id"), "{e}");
    assert!(!claim.exists(), "a failed rank leaves no claim");
    let (zero, one, two) = (
        spawn(0, 10_000, 5),
        spawn(1, 10_000, 0),
        spawn(2, 10_000, 0),
    );
    for h in [zero, one, two] {
        assert_eq!(h.join().unwrap().unwrap(), id(5));
    }
    for r in 0..3 {
        rv.finish(r, 3);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
