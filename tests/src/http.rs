//! HTTP requests to `lb`'s admin listener, made from inside a test
//! namespace (the listener usually binds that namespace's loopback).

use std::time::Duration;

/// GET `url` from inside the network namespace named `netns` within
/// `timeout`: (status code, body). A 4xx or 5xx status is an answer, not an
/// error; a refused or timed-out connection is an error.
pub fn get_in(netns: &str, url: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let url = url.to_owned();
    crate::netns::enter_named(netns, move || -> anyhow::Result<(u16, String)> {
        let agent = ureq::AgentBuilder::new().timeout(timeout).build();
        match agent.get(&url).call() {
            Ok(r) => Ok((r.status(), r.into_string()?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string()?)),
            Err(e) => Err(e.into()),
        }
    })?
}
