//! What the user asked to see: the `ss`-style filter language over sockets ([`ss`]), a
//! table's whole selection ([`select`]), the conditions a stream record must meet
//! ([`stream`]), and those of a record read from the event log ([`recorded`]).
pub mod host;
pub mod recorded;
pub mod select;
pub mod ss;
pub mod stream;
