//! Free loopback ports for processes that bind them later.
//!
//! A port the kernel offers with `bind(0)` is only free until someone binds
//! it, and it comes from the ephemeral range, which is also where every
//! outgoing connection on the machine takes its local port. A test or the
//! load-test harness that chooses a replica's address now and starts the
//! replica seconds later (or restarts it on the same address) can find the
//! port taken by a client's connection. Ports here come from below that
//! range, where only an explicit bind can take them, and are never handed
//! out twice in one process.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    ops::Range,
    sync::Mutex,
};

/// Ports handed out by this process so far.
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The ports chosen from: the lower half below the ephemeral range
/// (Linux's default range starts at 32768; elsewhere assume that).
fn range() -> Range<u16> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    (ephemeral / 2).max(1024)..ephemeral
}

/// A loopback port free now, outside the ephemeral range when there is
/// room below it, and not handed out before by this process.
pub fn loopback_port() -> std::io::Result<u16> {
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    let range = range();
    // Tried on the wildcard address: a process that binds it there (a
    // replica's Raft port) conflicts with a socket on the port at any
    // address.
    for _ in 0..1000 {
        if range.is_empty() {
            break;
        }
        let port = fastrand::u16(range.clone());
        if !given.contains(&port) && TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    // No room below the ephemeral range (or none free): the kernel's choice.
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if given.insert(port) {
            return Ok(port);
        }
    }
}

/// [`loopback_port`] as an address on 127.0.0.1.
pub fn loopback_address() -> std::io::Result<SocketAddr> {
    loopback_port().map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// [`loopback_port`] for tests: panics when the machine has no free port.
pub fn free_port() -> u16 {
    loopback_port().unwrap_or_else(|error| panic!("no free loopback port: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let below = range().end;
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), ports.len());
        for port in ports {
            assert!(port < below, "{port} is within the ephemeral range");
            TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .unwrap_or_else(|e| panic!("{port}: {e}"));
        }
    }
}
