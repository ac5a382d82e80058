//! The L4 userspace path: a pair the kernel cannot take (eBPF off, map full, socket
//! closed during set-up) is carried by the copy engine (`relay`), with the kernel path's
//! contract (half-close, resets, idle timeout), and listed for `forwarder conns`.

use tokio::net::TcpStream;

use crate::conn_list::Registration;
use crate::ebpf::Datapath;
use crate::l4::{Outcome, SessionOptions};
use crate::relay;

pub async fn run(
    client: TcpStream,
    upstream: TcpStream,
    options: &SessionOptions,
    mut registration: Option<&mut Registration<&Datapath>>,
) -> Outcome {
    let copied = relay::join(client, upstream, options.idle_timeout, |progress| {
        if let Some(registration) = registration.as_mut() {
            registration.update(progress.bytes_up, progress.bytes_down, progress.last_io_ns);
        }
    })
    .await;
    Outcome::copied(copied)
}
