//! Empty library target: it lets `netwatch` name this crate as a build-dependency, so cargo
//! rebuilds netwatch (and with it the embedded kernel object) when the programs change.
#![no_std]
