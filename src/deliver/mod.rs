//! Delivering: the HTTP client and its address guard, the sender that
//! claims and sends, the retry policy, and the batched outcome writer.

pub mod client;
pub mod complete;
pub mod guard;
pub mod retry;
pub mod worker;
