//! Rendering only: stream records as text lines ([`stream`]) and the socket table as `ss`
//! lays it out ([`table`]), each endpoint written one way ([`address`]). What a record holds
//! is [`crate::record`]'s business. Diagnostics go through [`diagnostics`].
pub mod address;
pub mod counters;
pub mod diagnostics;
pub mod history;
pub mod stats;
pub mod stream;
pub mod table;

pub use stream::{Format, TextLayout};
