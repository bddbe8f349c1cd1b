//! thorn: signed webhooks from PostgreSQL row changes.
//!
//! The flow (DESIGN.md §1): capture triggers write `thorn.event` in the
//! application's transaction → the [`dispatch`] task matches events to
//! subscribers ([`matcher`]) and writes deliveries → the [`deliver`] tasks
//! sign ([`sign`]) and POST them ([`payload`]) with retries. [`daemon`]
//! wires the tasks; [`db`] holds every query.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod deliver;
pub mod dispatch;
pub mod matcher;
pub mod ops;
pub mod payload;
pub mod receive;
pub mod retention;
pub mod serve;
pub mod sign;
