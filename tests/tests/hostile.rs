//! Hostile peers of each kind: a fleet member that claims to hold a blob and then sends a
//! truncated stream, ranges other than those asked, a frame prefix of 4 GiB, one byte at a
//! time, or nothing it claimed. The hostile peer is asked (its misbehaviour is met, not
//! avoided); a lie (bytes or a header that fail) bans it for the download, a peer that is
//! slow or lacks what it claimed is left behind unbanned; not a byte of it is kept (every
//! byte comes from the origin), and the reload ends within the swarm's request deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use iroh::endpoint::{RecvStream, SendStream};
use voltool_agent::control::ReloadMode;
use voltool_agent::coord_client::CoordClient;
use voltool_agent::net;
use voltool_agent::store::Store;
use voltool_protocol::blobs::{self, BlobRequest, GetHeader, Held, piece_ranges};
use voltool_protocol::coord::{CoordRequest, CoordResponse};
use voltool_protocol::swarm::PieceSet;
use voltool_protocol::{Hash, RangeList};
use voltool_tests::{TestFleet, bytes, tree};

#[derive(Clone, Copy, Debug)]
enum Lie {
    /// Half the encoding, then the end of the stream.
    Truncated,
    /// The encoding of other ranges than those asked.
    OtherRanges,
    /// A frame prefix announcing 4 GiB instead of a header.
    HugePrefix,
    /// The encoding one byte every 200 ms.
    Slowloris,
    /// Claims the blob, then answers that it does not hold it.
    NotHeld,
}

/// Serves `content` (held in `store`) as `lie` says, counting requests.
async fn answer(
    mut send: SendStream,
    mut recv: RecvStream,
    store: Store,
    lie: Lie,
    asked: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let req: BlobRequest = net::read_frame(&mut recv, blobs::MAX_REQUEST).await?;
    let (hash, size, ranges) = match req {
        BlobRequest::Subscribe {
            size, piece_bytes, ..
        } => {
            // Claims every piece, and keeps the subscription open.
            let units = PieceSet::full(blobs::pieces(size, piece_bytes));
            net::write_frame(&mut send, &Held { units }).await?;
            let mut buf = [0u8; 64];
            while let Ok(Some(_)) = recv.read(&mut buf).await {}
            return Ok(());
        }
        BlobRequest::Get {
            hash, size, ranges, ..
        } => (hash, size, ranges),
        BlobRequest::Pick {
            hash,
            size,
            piece_bytes,
            among,
            ..
        } => {
            let Some(unit) = among.iter().next() else {
                return Ok(());
            };
            asked.fetch_add(1, Ordering::SeqCst);
            if !matches!(lie, Lie::HugePrefix | Lie::NotHeld) {
                net::write_frame(&mut send, &GetHeader::Picked { unit }).await?;
            }
            return misbehave(
                send,
                &store,
                lie,
                hash,
                size,
                piece_ranges(size, piece_bytes, unit),
            )
            .await;
        }
        BlobRequest::GetMany { blobs, .. } => {
            for _ in blobs {
                net::write_frame(&mut send, &GetHeader::NotFound).await?;
            }
            send.finish()?;
            return Ok(());
        }
        _ => return Ok(()),
    };
    asked.fetch_add(1, Ordering::SeqCst);
    if !matches!(lie, Lie::HugePrefix | Lie::NotHeld) {
        net::write_frame(&mut send, &GetHeader::Ok).await?;
    }
    misbehave(send, &store, lie, hash, size, ranges).await
}

async fn misbehave(
    mut send: SendStream,
    store: &Store,
    lie: Lie,
    hash: Hash,
    size: u64,
    ranges: RangeList,
) -> anyhow::Result<()> {
    let encode = |r: &RangeList| {
        let mut out = Vec::new();
        store.encode(&hash, size, r, &mut out).map(|()| out)
    };
    match lie {
        Lie::Truncated => {
            let enc = encode(&ranges)?;
            send.write_all(&enc[..enc.len() / 2]).await?;
        }
        Lie::OtherRanges => {
            let chunks = size.div_ceil(1024);
            let first = ranges.0.first().map_or(0, |r| r.0);
            let other = if first >= 16 {
                RangeList(vec![(0, 16)])
            } else {
                RangeList(vec![(chunks - 16, chunks)])
            };
            send.write_all(&encode(&other)?).await?;
        }
        Lie::HugePrefix => send.write_all(&u32::MAX.to_le_bytes()).await?,
        Lie::Slowloris => {
            // Bounded: a receiver that gave up stops the stream, and the write fails.
            for b in encode(&ranges)? {
                if send.write_all(&[b]).await.is_err() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Lie::NotHeld => net::write_frame(&mut send, &GetHeader::NotFound).await?,
    }
    let _ = send.finish();
    Ok(())
}

/// A fleet where the only holders of a 2 MiB blob are the origin and a member that lies
/// as `lie` says; agent 0 reloads it.
async fn reload_past(lie: Lie) {
    let mut f = TestFleet::start(3).await;
    f.create("vol").await;
    let content = bytes(9, 2 << 20);
    let hash = Hash::of(&content);
    let r = f.mount(0, "vol").await;
    let w = f.mount(1, "vol").await;
    std::fs::write(w.join("model.bin"), &content).unwrap();
    f.commit(1, "vol").await.unwrap();

    // Agent 2's key, serving lies; the writer stops, so only the origin and the liar
    // hold the blob.
    let key = voltool_agent::keys::load_or_create(&f.agent_dir(2)).unwrap();
    f.agents.pop().unwrap().shutdown().await;
    f.agents.pop().unwrap().shutdown().await;
    let ep = net::bind(
        key,
        "127.0.0.1:0".parse().unwrap(),
        vec![blobs::ALPN.to_vec()],
        Default::default(),
    )
    .await
    .unwrap();
    let dir = voltool_tests::test_dir();
    let store = Store::open(dir.path()).unwrap();
    store.import_bytes(&content).unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let server = {
        let (ep, store, asked) = (ep.clone(), store.clone(), asked.clone());
        tokio::spawn(async move {
            while let Some(inc) = ep.accept().await {
                let (store, asked) = (store.clone(), asked.clone());
                tokio::spawn(async move {
                    let Ok(accepting) = inc.accept() else { return };
                    let Ok(conn) = accepting.await else { return };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        let (store, asked) = (store.clone(), asked.clone());
                        tokio::spawn(answer(send, recv, store, lie, asked));
                    }
                });
            }
        })
    };
    let coord = CoordClient::new(ep.clone(), f.coord.as_ref().unwrap().addr());
    let announced = coord
        .request(&CoordRequest::Announce {
            addr: net::local_addr(&ep),
            zone: None,
            blobs: vec![hash],
            complete: true,
        })
        .await
        .unwrap();
    assert!(matches!(announced, CoordResponse::Ok));

    let started = std::time::Instant::now();
    let rep = f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    let took = started.elapsed();
    assert_eq!(tree(&w), tree(&r), "{lie:?}");
    let liar = ep.id().to_string();
    let s = &rep.sources;
    let lies = matches!(lie, Lie::Truncated | Lie::OtherRanges | Lie::HugePrefix);
    assert_eq!(
        s.banned,
        if lies { vec![liar] } else { Vec::new() },
        "{lie:?}: {s:?}"
    );
    assert_eq!(
        (s.peer_bytes, s.origin_bytes),
        (0, content.len() as u64),
        "{lie:?}: {s:?}"
    );
    // Not a wait on the liar: the deadline of a request (10 s plus its bytes at 64 KiB/s,
    // 18 s for a 512 KiB piece) bounds what it can hold a piece back.
    assert!(
        took < Duration::from_secs(30),
        "{lie:?}: the reload took {took:?}"
    );
    assert_eq!(std::fs::read(r.join("model.bin")).unwrap(), content);
    assert!(
        asked.load(Ordering::SeqCst) > 0,
        "{lie:?}: the liar was never asked"
    );
    server.abort();
    ep.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_stream_is_refused_and_the_blob_comes_whole() {
    reload_past(Lie::Truncated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_other_than_those_asked_are_refused() {
    reload_past(Lie::OtherRanges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_length_prefix_is_refused() {
    reload_past(Lie::HugePrefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_a_byte_at_a_time_is_left_behind() {
    reload_past(Lie::Slowloris).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_hold_what_it_claimed_is_left_behind() {
    reload_past(Lie::NotHeld).await;
}
