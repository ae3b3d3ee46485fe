//! Davit's agent: the worker that runs on every VM of the fleet. It never links coordinator
//! code; it talks to coordinators only through the protocols in `davit-proto`.

pub use davit_proto;
