//! What the user asked to see: the `ss`-style filter language over sockets ([`ss`]), a
//! table's whole selection ([`select`]), and the conditions a stream record must meet
//! ([`stream`]).
pub mod host;
pub mod select;
pub mod ss;
pub mod stream;
