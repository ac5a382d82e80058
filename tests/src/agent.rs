//! The agent as the tests start it: from a `Config`, with its eBPF data path, kept
//! running until this is dropped.

use std::sync::Arc;

use forwarder::agent::{self, FrontendMetrics, RunOptions, Running};
use forwarder::config::Config;
use forwarder::ebpf::Datapath;
use forwarder::metrics::L4Metrics;
use tokio::sync::watch;

pub struct StartedAgent {
    pub running: Vec<Running>,
    pub datapath: Option<Arc<Datapath>>,
    _stop: watch::Sender<bool>,
}

impl StartedAgent {
    /// Validates `config`, binds its frontends and starts serving.
    pub async fn start(config: &Config) -> Self {
        config.validate().expect("test config is valid");
        let (stop, stopped) = watch::channel(false);
        let (running, datapath) = agent::start(config, &RunOptions::default(), stopped)
            .await
            .expect("agent starts");
        Self {
            running,
            datapath,
            _stop: stop,
        }
    }

    pub fn port(&self, frontend: usize) -> u16 {
        self.running[frontend].addr.port()
    }

    /// The counters of an L4 (splice or originate) frontend.
    pub fn l4(&self, frontend: usize) -> &Arc<L4Metrics> {
        match &self.running[frontend].metrics {
            FrontendMetrics::L4(metrics) => metrics,
            FrontendMetrics::Http(_) => panic!("frontend {frontend} is not an L4 frontend"),
        }
    }
}
