//! The etcd client: the only module that knows etcd-client. Everything that talks to etcd (the
//! source's read and watch, `announce`, the fleet view, `version`) connects, authenticates,
//! backs off and reads through here, and sees etcd-client's types only as re-exported below.
//!
//! - `connect`: TLS, auth, HTTP/2 keep-alive, proving a connection with `status()`, and
//!   [`Members`], which talks to one member at a time and leaves one that fails or knows no
//!   leader.
//! - `failure`: every etcd-client error as a [`Failure`] of one [`Kind`] (retry, refused
//!   credentials, compacted, too large), with a message that names the setting to fix.
//! - `backoff`: the floor for refused credentials, and [`backoff_sleep`], which a fixed password
//!   ends early.
//! - `pages`: [`Pages`], a range read in pages at one revision, every message at most
//!   [`MAX_MESSAGE`].
//! - `lease`: a lease held by a long-running client (announce's key, the fleet view's node key).

mod backoff;
mod connect;
mod failure;
pub(crate) mod history;
pub mod lease;
mod pages;

pub(crate) use crate::backoff::Backoff;
pub(crate) use backoff::{Outage, Recovered, Retry, backoff_sleep};
pub(crate) use connect::{
    KEEP_ALIVE_TIMEOUT, Members, connect_options, connect_with, dial_timeout, leader_known,
};
pub(crate) use failure::{Failure, Kind};
pub(crate) use pages::{MAX_MESSAGE, Pages, READ_TIMEOUT};

/// etcd-client's types, for the modules that read, watch and write through this one.
pub(crate) use etcd_client::{
    Client, Error, EventType, GetOptions, GetResponse, KeyValue, KvClient, LeaseKeepAliveStream,
    LeaseKeeper, MaintenanceClient, PutOptions, WatchOptions, WatchResponse,
};
