//! Library target so the agent can build-depend on this crate (cargo rebuild tracking).
#![no_std]
