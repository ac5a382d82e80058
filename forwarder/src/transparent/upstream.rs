//! The upstream side of an L4 connection beyond the pools: the original destination of
//! an intercepted connection, and the PROXY v2 header some backends ask for.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd as _;
use std::time::Duration;

use tokio::net::TcpStream;

/// Connects to where the device was going: the accepted socket's local address, which
/// for an intercepted connection is the destination the device named (sk_lookup hands
/// the connection over with its addresses as they were).
pub async fn connect_original(
    client: &TcpStream,
    timeout: Duration,
    source: Option<IpAddr>,
) -> io::Result<(TcpStream, SocketAddr)> {
    let destination = client.local_addr()?;
    if is_this_host(destination.ip())? {
        // Not intercepted: a client that reached this host's own address (the listener
        // itself) would have the agent connect to itself, maybe without end.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{destination} is this host's own address, not an intercepted destination"),
        ));
    }
    let connect = async {
        match source {
            Some(source) => connect_from(source, destination).await,
            None => TcpStream::connect(destination).await,
        }
    };
    let stream = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("original destination {destination}: no connection within {timeout:?}"),
            )
        })?
        .map_err(|e| {
            io::Error::new(e.kind(), format!("original destination {destination}: {e}"))
        })?;
    stream.set_nodelay(true)?;
    Ok((stream, destination))
}

/// Whether the kernel would deliver to `ip` locally: a route lookup (a UDP `connect`,
/// which sends nothing) picks a local destination itself as the source address.
fn is_this_host(ip: std::net::IpAddr) -> io::Result<bool> {
    let unspecified: std::net::IpAddr = if ip.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let probe = std::net::UdpSocket::bind((unspecified, 0))?;
    match probe.connect((ip, 9)) {
        Ok(()) => Ok(probe.local_addr()?.ip() == ip),
        // No route: not this host either; the TCP connect will say why.
        Err(_) => Ok(false),
    }
}

/// Connects to `destination` from `source`, an address of another host (the device's):
/// `IP_TRANSPARENT` lets the socket bind it (port chosen by the kernel). The replies are
/// addressed to the device, so the host must take them in rather than forward them: the
/// routing rules `super::rules` adds for such upstream ports do that, and the upstream
/// must route the device's address back through this host.
pub async fn connect_from(source: IpAddr, destination: SocketAddr) -> io::Result<TcpStream> {
    let source = source.to_canonical();
    let socket = match destination {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    crate::sys::set_ip_transparent(socket.as_fd(), destination.is_ipv6())?;
    socket.bind(SocketAddr::new(source, 0)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("binding the device's address {source}: {e}"),
        )
    })?;
    socket.connect(destination).await
}

/// Writes the PROXY v2 header for `client` to a fresh upstream connection, before any
/// payload (so the payload itself is still spliced).
pub async fn send_proxy_v2(upstream: &TcpStream, client: &TcpStream) -> io::Result<()> {
    let header = super::proxy_v2::header(client.peer_addr()?, client.local_addr()?);
    let mut sent = 0;
    while sent < header.len() {
        upstream.writable().await?;
        match upstream.try_write(&header[sent..]) {
            Ok(n) => sent += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
