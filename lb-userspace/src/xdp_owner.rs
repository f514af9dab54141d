//! Who else runs XDP on an interface. An interface runs one XDP program; a
//! start that would only find out when attaching fails with EBUSY after its
//! maps were pinned, so `lb run` asks first.

use anyhow::Context as _;
use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkXdp};

/// The id of the XDP program attached to interface `ifindex` in any mode
/// (native, generic or offloaded; through a link or not), if any.
pub async fn attached_program(ifindex: u32) -> anyhow::Result<Option<u32>> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
    let connection = tokio::spawn(connection);
    let answer = handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await;
    connection.abort();
    let link = answer
        .with_context(|| format!("asking netlink about interface {ifindex}"))?
        .with_context(|| format!("no interface {ifindex}"))?;
    Ok(link
        .attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::Xdp(xdp) => Some(xdp),
            _ => None,
        })
        .flatten()
        .find_map(|x| match x {
            LinkXdp::ProgId(id) | LinkXdp::DrvProgId(id) | LinkXdp::SkbProgId(id) => {
                (*id != 0).then_some(*id)
            }
            _ => None,
        }))
}
