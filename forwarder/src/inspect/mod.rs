//! `forwarder conns|stats|maps`: what a running agent is doing, read from the maps it
//! pinned under /sys/fs/bpf/forwarder/<instance>/ (no connection to the agent needed).

mod table;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::maps::{HashMap, Map, MapData};
use forwarder_common::{
    ConnInfo, PATH_HTTPS, PATH_KERNEL, PATH_USERSPACE, PATH_WEBSOCKET, PeerLink, SockCounters,
    StatKey, names,
};
use serde::Serialize;

use crate::conn_list::socket_addr;
use crate::ebpf::{name_from_bytes, pin_dir_for};
use crate::sys;
use table::Table;

/// The splice maps a running agent pinned.
pub struct Pinned {
    dir: PathBuf,
    conns: HashMap<MapData, u64, ConnInfo>,
    counters: HashMap<MapData, u64, SockCounters>,
    links: HashMap<MapData, u64, PeerLink>,
    stats: HashMap<MapData, StatKey, u64>,
}

fn open_map(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl Pinned {
    pub fn open(instance: &str) -> anyhow::Result<Self> {
        let dir = pin_dir_for(instance);
        if !dir.join(names::CONNS).exists() {
            anyhow::bail!(
                "no agent maps are pinned in {}: is `forwarder run` running for instance {instance:?}? \
                 (the demo's instance is \"demo\"; reading pins needs root)",
                dir.display()
            );
        }
        Ok(Self {
            conns: open_map(&dir, names::CONNS)?.try_into()?,
            counters: open_map(&dir, names::COUNTERS)?.try_into()?,
            links: open_map(&dir, names::LINKS)?.try_into()?,
            stats: open_map(&dir, names::STATS)?.try_into()?,
            dir,
        })
    }
}

/// One row of `forwarder conns`.
#[derive(Debug, Serialize)]
pub struct ConnRow {
    pub frontend: String,
    pub client: String,
    pub upstream: String,
    /// "kernel", "userspace", "https" or "websocket".
    pub path: &'static str,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub age_secs: f64,
    pub idle_secs: f64,
}

pub fn conns(pinned: &Pinned) -> Vec<ConnRow> {
    let now = sys::monotonic_ns();
    let secs = |ns: u64| now.saturating_sub(ns) as f64 / 1e9;
    let mut rows: Vec<ConnRow> = pinned
        .conns
        .iter()
        .filter_map(Result::ok)
        .map(|(cookie, info)| {
            let kernel = info.path == PATH_KERNEL;
            let (mut up, mut down, mut last) =
                (info.bytes_up, info.bytes_down, info.last_active_ns);
            if kernel {
                // Every byte a socket received met the verdict: redirected or passed.
                let seen = |c: u64| {
                    pinned
                        .counters
                        .get(&c, 0)
                        .map(|k| (k.redirected_bytes + k.passed_bytes, k.last_active_ns))
                        .unwrap_or((0, 0))
                };
                let (client, upstream) = (seen(cookie), seen(info.upstream_cookie));
                up = client.0;
                down = upstream.0;
                last = client.1.max(upstream.1).max(info.started_ns);
            }
            ConnRow {
                frontend: name_from_bytes(&info.frontend),
                client: listed_addr(info.client_addr, info.client_port),
                // HTTPS requests go over pooled upstream connections: no one upstream.
                upstream: listed_addr(info.upstream_addr, info.upstream_port),
                path: path_name(info.path),
                bytes_up: up,
                bytes_down: down,
                age_secs: secs(info.started_ns),
                idle_secs: secs(last),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.frontend, &a.client).cmp(&(&b.frontend, &b.client)));
    rows
}

fn listed_addr(addr: [u8; 16], port: u16) -> String {
    socket_addr(addr, port).map_or_else(|| "-".to_string(), |a| a.to_string())
}

fn path_name(path: u8) -> &'static str {
    match path {
        PATH_KERNEL => "kernel",
        PATH_USERSPACE => "userspace",
        PATH_HTTPS => "https",
        PATH_WEBSOCKET => "websocket",
        _ => "unknown",
    }
}

/// Counters by frontend, in a stable order.
pub fn stats(
    pinned: &Pinned,
) -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>> {
    let mut out: std::collections::BTreeMap<_, std::collections::BTreeMap<_, _>> =
        Default::default();
    for (key, value) in pinned.stats.iter().filter_map(Result::ok) {
        out.entry(name_from_bytes(&key.frontend))
            .or_default()
            .insert(name_from_bytes(&key.counter), value);
    }
    out
}

pub fn print_conns(pinned: &Pinned, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let rows = conns(pinned);
    if json {
        writeln!(out, "{}", serde_json::to_string(&rows)?)?;
        return Ok(());
    }
    let mut table = Table::new([
        "FRONTEND", "CLIENT", "UPSTREAM", "PATH", "UP", "DOWN", "AGE", "IDLE",
    ]);
    for r in &rows {
        table.row([
            r.frontend.clone(),
            r.client.clone(),
            r.upstream.clone(),
            r.path.to_string(),
            table::bytes(r.bytes_up),
            table::bytes(r.bytes_down),
            table::duration(r.age_secs),
            table::duration(r.idle_secs),
        ]);
    }
    table.print(out)?;
    writeln!(out, "{} connection(s)", rows.len())?;
    Ok(())
}

pub fn print_stats(pinned: &Pinned, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let stats = stats(pinned);
    let xdp = crate::xdp::XdpMaps::open_pinned(&pinned.dir)
        .and_then(|maps| maps.stats())
        .ok();
    if json {
        let mut value = serde_json::json!({ "frontends": stats });
        if let Some(xdp) = &xdp {
            let named: serde_json::Map<String, serde_json::Value> = xdp
                .named()
                .map(|(n, v)| (n.to_string(), v.into()))
                .collect();
            value["xdp"] = named.into();
        }
        writeln!(out, "{value}")?;
        return Ok(());
    }
    for (frontend, counters) in &stats {
        match frontend.strip_prefix(crate::agent::BACKEND_PREFIX) {
            Some(backend) => writeln!(out, "backend {backend}")?,
            None => writeln!(out, "frontend {frontend}")?,
        }
        let mut table = Table::new(["COUNTER", "VALUE"]);
        for (name, value) in counters {
            let shown = if name.starts_with("bytes") || name.ends_with("_bytes") {
                table::bytes(*value)
            } else {
                value.to_string()
            };
            table.row([format!("  {name}"), shown]);
        }
        table.print(out)?;
    }
    if let Some(xdp) = xdp {
        writeln!(out, "xdp")?;
        let mut table = Table::new(["COUNTER", "PACKETS"]);
        for (name, value) in xdp.named() {
            table.row([format!("  {name}"), value.to_string()]);
        }
        table.print(out)?;
    }
    Ok(())
}

/// Every pinned splice map's entries, read once.
struct MapDump {
    sockets: Vec<u64>,
    links: Vec<(u64, PeerLink)>,
    counters: Vec<(u64, SockCounters)>,
    conns: Vec<(u64, ConnInfo)>,
    stats: Vec<(StatKey, u64)>,
}

impl MapDump {
    fn read(pinned: &Pinned) -> Self {
        let sockets = open_map(&pinned.dir, names::SOCKS)
            .ok()
            .and_then(|m| aya::maps::SockHash::<MapData, u64>::try_from(m).ok())
            .map(|m| m.keys().filter_map(Result::ok).collect::<Vec<u64>>())
            .unwrap_or_default();
        Self {
            sockets,
            links: pinned.links.iter().filter_map(Result::ok).collect(),
            counters: pinned.counters.iter().filter_map(Result::ok).collect(),
            conns: pinned.conns.iter().filter_map(Result::ok).collect(),
            stats: pinned.stats.iter().filter_map(Result::ok).collect(),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            names::SOCKS: self.sockets,
            names::LINKS: self.links.iter().map(|(k, v)| serde_json::json!({
                "cookie": k, "peer_cookie": v.peer_cookie, "redirect_limit": v.redirect_limit,
                "refresh_at": v.refresh_at, "passed_mark": v.passed_mark,
            })).collect::<Vec<_>>(),
            names::COUNTERS: self.counters.iter().map(|(k, v)| serde_json::json!({
                "cookie": k, "redirected_bytes": v.redirected_bytes,
                "redirected_segments": v.redirected_segments, "passed_bytes": v.passed_bytes,
                "passed_segments": v.passed_segments, "last_active_ns": v.last_active_ns,
                "over_budget": v.over_budget, "events_lost": v.events_lost,
            })).collect::<Vec<_>>(),
            names::CONNS: self.conns.iter().map(|(k, v)| serde_json::json!({
                "cookie": k, "frontend": name_from_bytes(&v.frontend),
                "client": listed_addr(v.client_addr, v.client_port),
                "upstream": listed_addr(v.upstream_addr, v.upstream_port),
                "upstream_cookie": v.upstream_cookie, "path": v.path,
                "started_ns": v.started_ns, "bytes_up": v.bytes_up, "bytes_down": v.bytes_down,
            })).collect::<Vec<_>>(),
            names::STATS: self.stats.iter().map(|(k, v)| serde_json::json!({
                "frontend": name_from_bytes(&k.frontend), "counter": name_from_bytes(&k.counter),
                "value": v,
            })).collect::<Vec<_>>(),
        })
    }

    fn print_splice_maps(&self, out: &mut impl Write) -> std::io::Result<()> {
        let sockets = &self.sockets;
        writeln!(
            out,
            "{} ({} sockets): {sockets:?}",
            names::SOCKS,
            sockets.len()
        )?;
        writeln!(out, "{} ({} entries)", names::LINKS, self.links.len())?;
        for (cookie, l) in &self.links {
            writeln!(
                out,
                "  {cookie} -> peer {} redirect_limit {} refresh_at {} passed_mark {}",
                l.peer_cookie, l.redirect_limit, l.refresh_at, l.passed_mark
            )?;
        }
        writeln!(out, "{} ({} entries)", names::COUNTERS, self.counters.len())?;
        for (cookie, c) in &self.counters {
            writeln!(
                out,
                "  {cookie}: redirected {} B / {} segs, passed {} B / {} segs, over_budget {}, last_active_ns {}",
                c.redirected_bytes,
                c.redirected_segments,
                c.passed_bytes,
                c.passed_segments,
                c.over_budget,
                c.last_active_ns
            )?;
        }
        Ok(())
    }

    fn print_listings(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "{} ({} entries)", names::CONNS, self.conns.len())?;
        for (cookie, c) in &self.conns {
            writeln!(
                out,
                "  {cookie}: {} {} -> {} path {} upstream_cookie {}",
                name_from_bytes(&c.frontend),
                listed_addr(c.client_addr, c.client_port),
                listed_addr(c.upstream_addr, c.upstream_port),
                c.path,
                c.upstream_cookie
            )?;
        }
        writeln!(out, "{} ({} entries)", names::STATS, self.stats.len())?;
        for (k, v) in &self.stats {
            writeln!(
                out,
                "  {}/{} = {v}",
                name_from_bytes(&k.frontend),
                name_from_bytes(&k.counter)
            )?;
        }
        Ok(())
    }
}

/// Every pinned map decoded entry by entry (`forwarder maps`).
pub fn print_maps(pinned: &Pinned, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let dump = MapDump::read(pinned);
    if json {
        writeln!(out, "{}", dump.to_json())?;
        return Ok(());
    }
    dump.print_splice_maps(out)?;
    dump.print_listings(out)?;
    if let Ok(maps) = crate::xdp::XdpMaps::open_pinned(&pinned.dir) {
        writeln!(out, "XDP guard maps (see also `forwarder xdp list|stats`)")?;
        writeln!(out, "  XDP_PORTS: {:?}", maps.ports())?;
        if let Ok(stats) = maps.stats() {
            for (name, n) in stats.named() {
                writeln!(out, "  XDP_STATS/{name} = {n}")?;
            }
        }
    }
    Ok(())
}
