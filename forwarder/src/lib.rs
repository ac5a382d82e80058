//! forwarder: an eBPF-accelerated forwarder for Azure IoT Hub and any MQTT/AMQP/HTTPS endpoint.
pub mod admin;
pub mod agent;
pub mod config;
pub mod demo;
pub mod ebpf;
pub mod http;
pub mod inspect;
pub mod l4;
pub mod listener;
pub mod metrics;
pub mod registry;
pub mod relay;
pub mod sys;
pub mod xdp;
