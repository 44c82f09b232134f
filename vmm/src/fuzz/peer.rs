//! The peer protocol after the transport: a peer's hello, and the messages
//! of an established link ([`PeerMsg`]) with the checks every receiver
//! applies before acting (offers, page batches, layouts, output, signals,
//! gossip tables merged into a membership table, process images).
//!
//! The sealed frame layer underneath (lengths, truncation, MACs) is the
//! `frame` target.

use std::time::Instant;

use pmivmm_proto::image::ProcessImage;
use pmivmm_proto::prelayout::PreLayout;

use super::class;
use crate::cluster::membership::{Member, Membership, NodeLoad};
use crate::migration::protocol::{self, HomeRef, Offer, PeerMsg};
use crate::peer::auth::Hello;

pub fn run_one(data: &[u8]) -> String {
    let Some((&mode, bytes)) = data.split_first() else { return "empty".into() };
    if mode % 4 == 0 {
        return match Hello::decode(bytes) {
            Ok(_) => "hello ok".into(),
            Err(e) => format!("hello {}", class(&e)),
        };
    }
    // The data part of the frame follows the message; where is up to the input.
    let (msg, rest) = match postcard::take_from_bytes::<PeerMsg>(bytes) {
        Ok(decoded) => decoded,
        Err(e) => return format!("decode {}", class(&e)),
    };
    let checked = match &msg {
        PeerMsg::Offer(offer) => offer.validate().map_err(|e| class(&e)),
        PeerMsg::Pages { vaddrs } => protocol::check_pages(vaddrs, rest).map_err(|e| class(&e)),
        PeerMsg::Output { fd } => protocol::check_output(*fd, rest).map_err(|e| class(&e)),
        PeerMsg::Signal { signal } => protocol::check_signal(*signal).map_err(|e| class(&e)),
        PeerMsg::Image { image } => ProcessImage::from_bytes(image).map(drop).map_err(|e| class(&e)),
        PeerMsg::Layout(layout) => layout.validate(1 << 20).map_err(|e| class(&e)),
        PeerMsg::Gossip { members } => {
            let mut table = Membership::new(member("me"));
            table.merge(members, Instant::now()).map_err(|e| class(&e)).map(|()| {
                table.tick(NodeLoad::default(), false, Instant::now());
                let _ = (table.gossip(Instant::now()), table.view(Instant::now()), table.peers());
            })
        }
        _ => Ok(()),
    };
    match checked {
        Ok(()) => format!("{} ok", msg.name()),
        Err(e) => format!("{} {e}", msg.name()),
    }
}

fn member(name: &str) -> Member {
    Member { name: name.into(), addr: "127.0.0.1:7000".into(), heartbeat: 1, load: NodeLoad::default(), blocked: false }
}

/// One input per message kind, a hello and a gossip table.
pub fn seeds() -> Vec<Vec<u8>> {
    let offer = Offer {
        id: 7,
        home: HomeRef { node: "n1".into(), addr: "127.0.0.1:7000".into(), token: 1, pid: 42 },
    };
    let messages = [
        PeerMsg::Offer(offer),
        PeerMsg::Attach { token: 3 },
        PeerMsg::Query { id: 7 },
        PeerMsg::Pages { vaddrs: vec![0x40_0000, 0x40_1000] },
        PeerMsg::Image { image: crate::checkpoint::dir::sample_image(1).to_bytes() },
        PeerMsg::Commit,
        PeerMsg::Layout(PreLayout::of(&[(0x40_0000, 0x50_0000)], [0x40_0000, 0x40_3000])),
        PeerMsg::Running { pid: 9 },
        PeerMsg::Refused { reason: "busy".into() },
        PeerMsg::Output { fd: 1 },
        PeerMsg::Signal { signal: 15 },
        PeerMsg::Gossip { members: vec![member("n1"), member("n2")] },
    ];
    let mut seeds: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| {
            let mut input = vec![1];
            input.extend(postcard::to_allocvec(m).expect("encoding a message"));
            input
        })
        .collect();
    seeds[3].extend(vec![0xab; 2 * 4096]);
    let mut hello = vec![0];
    hello.extend(postcard::to_allocvec(&Hello::new("n1", [5; 32])).expect("encoding a hello"));
    seeds.push(hello);
    seeds
}
