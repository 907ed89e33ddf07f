//! What the user asked to see: the `ss`-style filter language over sockets ([`ss`]), and the
//! conditions a stream record must meet ([`stream`]).
pub mod host;
pub mod ss;
pub mod stream;
