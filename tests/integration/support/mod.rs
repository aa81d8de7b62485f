//! Shared test support: real Synapse homeservers, a Matrix test client, and Conclave processes.
#![allow(dead_code)]

pub mod conclave;
pub mod element_call;
pub mod lab;
pub mod lk_clients;
pub mod lk_ws;
pub mod matrix_client;
pub mod synapse;
pub mod web;
