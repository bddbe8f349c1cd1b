//! Integration tests: a real PostgreSQL (a fresh database per test), a real
//! HTTP receiver on 127.0.0.1, the daemon's real tasks.

mod api;
mod capture;
mod cli;
mod config_subscribers;
mod consumers;
mod database_tls;
mod delivery;
mod hostile;
mod ops;
mod outbox;
mod policy;
mod process;
mod queries;
mod receivers;
mod resilience;
mod rows;
mod security;
mod statements;
mod support;
mod thorn_import;
mod upgrade;
