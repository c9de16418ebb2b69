//! Control-plane methods. Each takes named parameters, refuses unknown ones, and either
//! changes the registry completely or not at all.
//!
//! | method | params | result |
//! |---|---|---|
//! | `device.add` | `type` (`blk`/`net`) + the device's options (`id`, `socket`, `path`, `tap`, `switch`, ...) | the device |
//! | `device.remove` | `id`, optional `force` | `{}` |
//! | `device.list` | none | list of devices |
//! | `device.get` | `id` | the device |
//! | `device.stats` | `id` | totals and per-queue counters |
//! | `device.retry` | `id` (a recorded device that failed to start) | the device |
//! | `qos.set` | `id` + limits (`iops`, `bps`, `read-iops`, ..., `*-burst`, `*-burst-seconds`); `null` removes one | the device's limits |
//! | `qos.get` | `id` | limits, group, throttled requests, time spent waiting |
//! | `qos.group.add` | `name` + limits | the group |
//! | `qos.group.set` | `name` + limits (`null` removes) | the group |
//! | `qos.group.remove` | `name` (refused while devices use it) | `{}` |
//! | `qos.group.list` | none | groups with limits and members |
//! | `switch.add` | `name`, optional `uplink` (a tap) | the switch |
//! | `switch.remove` | `name` (refused while devices are its ports) | `{}` |
//! | `switch.list` | none | switches with ports, learnt MACs, counters |
//! | `switch.ports` | `name` | the switch's ports with their counters |
//! | `tier.status` | `id` (a tiered disk) | extents and bytes per tier, compression ratio, moves, progress |
//! | `tier.policy` | `id` + `hot-budget` (bytes), `idle-for` (`10m`), `promote-after` (reads); `null` removes | the policy |
//! | `tier.demote`, `tier.promote` | `id` + one of `all: true`, `extents: [..]`, `idle-for: "10m"` (demote); optional `wait` | the batch's tally (`wait`) or `{"started":true}` |
//! | `daemon.info` | none | version, device types, engines |
//! | `daemon.shutdown` | none | `{}`, then the daemon stops |

// Guest- or client-controlled numbers flow through here: no indexing or arithmetic that can
// panic or wrap silently (checked, saturating or `get` instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use crate::lock::lock;

use serde_json::{json, Map, Value};

use super::protocol::{parse_request, Response, RpcError, METHOD_NOT_FOUND, SERVER_ERROR};
use crate::config::options::OptionList;
use crate::devices::kind::DeviceConfig;
use crate::registry::{Registry, RegistryError};
use crate::storage::rbd::CephClient;
use crate::storage::tier::mover::BatchError;

/// Most sockets one `daemon.handover` carries (the kernel's SCM_MAX_FD is 253, stderr too).
const MAX_HANDOVER_SOCKETS: usize = 250;

/// Whether process `pid` is in our cgroup (a live upgrade's successor under our service).
fn same_cgroup(pid: u32) -> bool {
    let ours = std::fs::read_to_string("/proc/self/cgroup");
    let theirs = std::fs::read_to_string(format!("/proc/{pid}/cgroup"));
    matches!((ours, theirs), (Ok(a), Ok(b)) if a == b)
}

/// Called from another thread when a deferred answer is ready (wakes the server's loop).
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// A deferred answer: the result arrives on the channel, and [`Notify`] is called after.
pub type Pending = std::sync::mpsc::Receiver<Result<Value, RpcError>>;

/// What a request line gets.
pub enum Handled {
    /// The response, ready now.
    Now(Response),
    /// The response, ready now, with descriptors sent along with it (`daemon.handover`).
    NowWithFds(Response, Vec<std::os::fd::OwnedFd>),
    /// Long work (a `tier.demote` with `wait`) runs on a thread of its own; the answer to
    /// request `id` comes through `pending`. The server serves everyone else meanwhile.
    Later {
        /// The request's id.
        id: Value,
        /// Where the result arrives.
        pending: Pending,
    },
}

/// Handles one request line: its response, or where the response will come from. `trusted`:
/// the client is root or the daemon's own uid, and may hand the daemon over to a successor
/// (`daemon.handover`, `daemon.shutdown` with `successor`).
pub fn handle_line(
    registry: &Arc<Mutex<Registry>>,
    line: &[u8],
    notify: &Notify,
    trusted: bool,
) -> Handled {
    let request = match parse_request(line) {
        Ok(request) => request,
        Err(response) => return Handled::Now(*response),
    };
    let id = request.id.clone();
    let mut later = Later {
        notify,
        pending: None,
        fds: Vec::new(),
        trusted,
    };
    match dispatch(registry, &request.method, request.params, &mut later) {
        Ok(result) => match later.pending {
            Some(pending) => Handled::Later { id, pending },
            None if !later.fds.is_empty() => {
                Handled::NowWithFds(Response::ok(id, result), later.fds)
            }
            None => Handled::Now(Response::ok(id, result)),
        },
        Err(error) => Handled::Now(Response::err(id, error)),
    }
}

/// Lets a method answer later.
struct Later<'a> {
    notify: &'a Notify,
    pending: Option<Pending>,
    /// Descriptors to send with the answer.
    fds: Vec<std::os::fd::OwnedFd>,
    /// Whether the client may hand the daemon over.
    trusted: bool,
}

impl Later<'_> {
    fn require_trusted(&self, what: &str) -> Result<(), RpcError> {
        if self.trusted {
            Ok(())
        } else {
            Err(RpcError::new(
                SERVER_ERROR,
                "unauthorized",
                format!("{what} is for root or the daemon's own uid (one at a time)"),
            ))
        }
    }
}

impl Later<'_> {
    /// A sender for the deferred answer; the request is answered through it instead of by
    /// the method's return value.
    fn defer(&mut self) -> impl FnOnce(Result<Value, RpcError>) + Send + 'static {
        let (tx, rx) = std::sync::mpsc::channel();
        self.pending = Some(rx);
        let notify = Arc::clone(self.notify);
        move |result| {
            // The client may be gone: then nobody waits for the answer.
            let _ = tx.send(result);
            notify();
        }
    }
}

fn dispatch(
    registry: &Arc<Mutex<Registry>>,
    method: &str,
    params: Value,
    later: &mut Later<'_>,
) -> Result<Value, RpcError> {
    let mut params = Params::new(params)?;
    let result = match method {
        "device.add" => {
            let kind = params.string("type")?;
            let options = params.rest_as_options()?;
            let clients = ceph_clients(&kind, &options);
            if !clients.is_empty() {
                // A disk on a Ceph cluster connects on a thread of its own, without the
                // registry, and is answered later: a slow or unreachable cluster (up to 15 s)
                // holds this request only, not the control thread and every other client.
                let answer = later.defer();
                if let Err(e) = add_after_connecting(registry, kind, options, clients, answer) {
                    later.pending = None;
                    return Err(e);
                }
                return Ok(Value::Null);
            }
            let mut registry = lock(registry);
            let id = registry.add(&kind, options, true).map_err(registry_error)?;
            to_json(registry.describe(&id).map_err(registry_error)?)?
        }
        "device.remove" => {
            let id = params.string("id")?;
            let force = params.optional_bool("force")?.unwrap_or(false);
            params.finish()?;
            lock(registry).remove(&id, force).map_err(registry_error)?;
            json!({})
        }
        "device.list" => {
            params.finish()?;
            let devices = lock(registry).list();
            to_json(devices)?
        }
        "device.get" => {
            let id = params.string("id")?;
            params.finish()?;
            let device = lock(registry).describe(&id).map_err(registry_error)?;
            to_json(device)?
        }
        "device.retry" => {
            let id = params.string("id")?;
            params.finish()?;
            let mut registry = lock(registry);
            registry.retry(&id).map_err(registry_error)?;
            to_json(registry.describe(&id).map_err(registry_error)?)?
        }
        "device.resize" => {
            let id = params.string("id")?;
            let size = params.size("size")?;
            params.finish()?;
            let mut registry = lock(registry);
            registry.resize(&id, size).map_err(registry_error)?;
            to_json(registry.describe(&id).map_err(registry_error)?)?
        }
        "device.stats" => {
            let id = params.string("id")?;
            params.finish()?;
            let stats = lock(registry).stats(&id).map_err(registry_error)?;
            to_json(stats)?
        }
        "qos.set" => {
            let id = params.string("id")?;
            let changes = params.rest_as_changes()?;
            let qos = lock(registry)
                .set_qos(&id, changes)
                .map_err(registry_error)?;
            to_json(qos)?
        }
        "qos.get" => {
            let id = params.string("id")?;
            params.finish()?;
            let qos = lock(registry).qos(&id).map_err(registry_error)?;
            to_json(qos)?
        }
        "qos.group.add" => {
            let name = params.string("name")?;
            let options = params.rest_as_options()?;
            let group = lock(registry)
                .add_group(&name, options)
                .map_err(registry_error)?;
            to_json(group)?
        }
        "qos.group.set" => {
            let name = params.string("name")?;
            let changes = params.rest_as_changes()?;
            let group = lock(registry)
                .set_group(&name, changes)
                .map_err(registry_error)?;
            to_json(group)?
        }
        "qos.group.remove" => {
            let name = params.string("name")?;
            params.finish()?;
            lock(registry).remove_group(&name).map_err(registry_error)?;
            json!({})
        }
        "qos.group.list" => {
            params.finish()?;
            let groups = lock(registry).list_groups();
            to_json(groups)?
        }
        "switch.add" => {
            let name = params.string("name")?;
            let options = params.rest_as_options()?;
            let switch = lock(registry)
                .add_switch(&name, options)
                .map_err(registry_error)?;
            to_json(switch)?
        }
        "switch.remove" => {
            let name = params.string("name")?;
            params.finish()?;
            lock(registry)
                .remove_switch(&name)
                .map_err(registry_error)?;
            json!({})
        }
        "switch.list" => {
            params.finish()?;
            let switches = lock(registry).list_switches();
            to_json(switches)?
        }
        "switch.ports" => {
            let name = params.string("name")?;
            params.finish()?;
            let ports = lock(registry).switch_ports(&name).map_err(registry_error)?;
            to_json(ports)?
        }
        "tier.status" => {
            let id = params.string("id")?;
            params.finish()?;
            let store = lock(registry).tier_store(&id).map_err(registry_error)?;
            to_json(store.status(&id))?
        }
        "tier.policy" => {
            let id = params.string("id")?;
            let changes = params.rest_as_changes()?;
            let policy = lock(registry)
                .set_tier_policy(&id, changes)
                .map_err(registry_error)?;
            to_json(policy)?
        }
        method @ ("tier.demote" | "tier.promote") => {
            let down = method == "tier.demote";
            let id = params.string("id")?;
            let wait = params.optional_bool("wait")?.unwrap_or(false);
            let selection = params.selection(down)?;
            params.finish()?;
            let store = lock(registry).tier_store(&id).map_err(registry_error)?;
            let extents = crate::registry::tiers::select(&store, &selection, down)
                .map_err(RpcError::invalid_params)?;
            let refused = |e: BatchError| match e {
                BatchError::Busy(_) => RpcError::new(SERVER_ERROR, "busy", format!("{id}: {e}")),
                BatchError::Thread(_) => {
                    RpcError::new(SERVER_ERROR, "io", format!("cannot start the move: {e}"))
                }
            };
            if wait {
                // Answered when the batch ends; the control thread serves others meanwhile.
                let answer = later.defer();
                store
                    .start_batch(extents, down, move |progress| answer(to_json(progress)))
                    .map_err(|e| {
                        later.pending = None;
                        refused(e)
                    })?;
                Value::Null
            } else {
                store.start_batch(extents, down, |_| {}).map_err(refused)?;
                json!({"started": true})
            }
        }
        "daemon.info" => {
            params.finish()?;
            let devices = lock(registry).ids().len();
            json!({
                "name": "novacrond",
                "pid": std::process::id(),
                "version": env!("CARGO_PKG_VERSION"),
                "device-types": crate::devices::kind::DeviceConfig::KINDS,
                "engines": {
                    "uring": crate::storage::uring_available(),
                    "sync": true,
                    "null": true,
                },
                "devices": devices,
                "pid": std::process::id(),
            })
        }
        "daemon.shutdown" => {
            let successor = params.optional_u64("successor")?;
            params.finish()?;
            if let Some(pid) = successor {
                later.require_trusted("a successor")?;
                let pid = u32::try_from(pid)
                    .map_err(|_| RpcError::invalid_params("`successor` is not a pid"))?;
                // The handed-over sockets are the successor's now: not removed at stop.
                lock(registry).keep_sockets();
                super::handover::keep_socket();
                // The service manager follows the new process from now on, if it is in our
                // service's cgroup (novactl puts it there); any other pid is not told.
                if same_cgroup(pid) {
                    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::MainPid(pid)]) {
                        log::warn!("cannot hand the service to pid {pid}: {e}");
                    }
                } else {
                    log::warn!("successor pid {pid} is not in our cgroup: systemd not told");
                }
                log::info!("live upgrade: pid {pid} takes over; stopping");
            }
            // The main thread waits for SIGTERM; this takes the same, orderly path.
            crate::sys::signals::request_termination();
            json!({})
        }
        "daemon.handover" => {
            params.finish()?;
            later.require_trusted("daemon.handover")?;
            // A live upgrade (`novactl daemon upgrade`): the listening sockets (every device's,
            // then the control socket's) and our stderr go to the successor, in that order.
            let mut sockets = lock(registry).hand_over_sockets();
            match super::handover::hand_over() {
                Ok(control) => sockets.push(control),
                Err(e) => {
                    return Err(RpcError::new(
                        SERVER_ERROR,
                        "io",
                        format!("cannot hand the control socket over: {e}"),
                    ))
                }
            }
            let stderr = std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| RpcError::new(SERVER_ERROR, "io", format!("stderr: {e}")))?;
            if sockets.len() > MAX_HANDOVER_SOCKETS {
                return Err(RpcError::new(
                    SERVER_ERROR,
                    "too-large",
                    format!(
                        "{} sockets: one message carries at most {MAX_HANDOVER_SOCKETS}",
                        sockets.len()
                    ),
                ));
            }
            let paths: Vec<String> = sockets
                .iter()
                .map(|(path, _)| path.display().to_string())
                .collect();
            later.fds = sockets.into_iter().map(|(_, fd)| fd).collect();
            later.fds.push(stderr);
            // What the successor's environment must carry: the service manager's socket,
            // the log filter, and (test builds) the test hooks.
            let env: serde_json::Map<String, Value> = std::env::vars()
                .filter(|(key, _)| {
                    key == "NOTIFY_SOCKET" || key == "RUST_LOG" || key.starts_with("NOVACRON_")
                })
                .map(|(key, value)| (key, Value::String(value)))
                .collect();
            json!({
                "pid": std::process::id(),
                "argv": std::env::args().collect::<Vec<_>>(),
                "sockets": paths,
                "env": env,
            })
        }
        other => {
            return Err(RpcError::new(
                METHOD_NOT_FOUND,
                "unknown-method",
                format!("unknown method `{other}`"),
            ))
        }
    };
    Ok(result)
}

/// The Ceph clients a `device.add` would connect with (none for most devices, and none
/// for options that do not parse: the registry reports those as usual).
fn ceph_clients(kind: &str, options: &BTreeMap<String, String>) -> Vec<CephClient> {
    match DeviceConfig::parse(kind, OptionList::from_pairs(options.clone())) {
        Ok(DeviceConfig::Blk(config)) => config.ceph_clients().into_iter().cloned().collect(),
        _ => Vec::new(),
    }
}

/// At most this many `device.add`s wait for a Ceph cluster at once (each on its own thread).
const MAX_CONNECTING: usize = 4;

/// Connects to `clients` on a thread of its own, then adds the device (the registry lock is
/// taken only then, and the open reuses the connections) and answers through `answer`.
fn add_after_connecting(
    registry: &Arc<Mutex<Registry>>,
    kind: String,
    options: BTreeMap<String, String>,
    clients: Vec<CephClient>,
    answer: impl FnOnce(Result<Value, RpcError>) + Send + 'static,
) -> Result<(), RpcError> {
    static CONNECTING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    /// One of the [`MAX_CONNECTING`] places, given back when dropped (on every path).
    struct Place;
    impl Drop for Place {
        fn drop(&mut self) {
            CONNECTING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
    let place = Place;
    if CONNECTING.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_CONNECTING {
        return Err(RpcError::new(
            SERVER_ERROR,
            "busy",
            format!("{MAX_CONNECTING} devices are already connecting to a cluster"),
        ));
    }
    let registry = Arc::clone(registry);
    let spawned = std::thread::Builder::new()
        .name("device-add".into())
        .spawn(move || {
            let connected: Result<Vec<_>, _> = clients
                .iter()
                .map(crate::storage::rbd::image::connect_ahead)
                .collect();
            let result = match connected {
                Err(e) => Err(RpcError::new(
                    SERVER_ERROR,
                    "io",
                    format!("cannot connect to the cluster: {e}"),
                )),
                Ok(_connected) => {
                    let mut registry = lock(&registry);
                    registry
                        .add(&kind, options, true)
                        .and_then(|id| registry.describe(&id))
                        .map_err(registry_error)
                        .and_then(to_json)
                }
            };
            drop(place);
            answer(result);
        });
    // A thread that could not start dropped its closure, and the place with it.
    spawned.map(drop).map_err(|e| {
        RpcError::new(
            SERVER_ERROR,
            "io",
            format!("cannot start the connection: {e}"),
        )
    })
}

/// A typed result as the JSON the client sees.
fn to_json(value: impl serde::Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(value)
        .map_err(|e| RpcError::new(SERVER_ERROR, "io", format!("cannot encode the result: {e}")))
}

fn registry_error(error: RegistryError) -> RpcError {
    let kind = error.kind();
    let message = crate::registry::error_chain(&error);
    let code = if kind == "invalid-params" {
        super::protocol::INVALID_PARAMS
    } else {
        SERVER_ERROR
    };
    RpcError::new(code, kind, message)
}

/// Named parameters, consumed key by key; leftovers are an error.
struct Params(Map<String, Value>);

impl Params {
    fn new(value: Value) -> Result<Self, RpcError> {
        match value {
            Value::Null => Ok(Self(Map::new())),
            Value::Object(map) => Ok(Self(map)),
            _ => Err(RpcError::invalid_params("params must be an object")),
        }
    }

    fn string(&mut self, key: &str) -> Result<String, RpcError> {
        match self.0.remove(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(RpcError::invalid_params(format!(
                "`{key}` must be a string"
            ))),
            None => Err(RpcError::invalid_params(format!("missing `{key}`"))),
        }
    }

    /// A size: bytes as a number, or a string with an optional K/M/G/T suffix.
    fn size(&mut self, key: &str) -> Result<u64, RpcError> {
        match self.0.remove(key) {
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().unwrap_or(0)),
            Some(Value::String(s)) => crate::config::options::parse_size(&s)
                .map_err(|e| RpcError::invalid_params(format!("`{key}`: {e}"))),
            Some(_) => Err(RpcError::invalid_params(format!("`{key}` must be a size"))),
            None => Err(RpcError::invalid_params(format!("missing `{key}`"))),
        }
    }

    fn optional_u64(&mut self, key: &str) -> Result<Option<u64>, RpcError> {
        match self.0.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(_) => Err(RpcError::invalid_params(format!(
                "`{key}` must be a non-negative integer"
            ))),
        }
    }

    fn optional_bool(&mut self, key: &str) -> Result<Option<bool>, RpcError> {
        match self.0.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(RpcError::invalid_params(format!(
                "`{key}` must be true or false"
            ))),
        }
    }

    /// Which extents a tier move names: exactly one of `all: true`, `extents: [..]` or (for
    /// demotions) `idle-for: "10m"`.
    fn selection(&mut self, down: bool) -> Result<crate::registry::tiers::Selection, RpcError> {
        use crate::config::options::parse_duration;
        use crate::registry::tiers::Selection;
        let all = self.optional_bool("all")?.unwrap_or(false);
        let extents = match self.0.remove("extents") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_u64().ok_or_else(|| {
                            RpcError::invalid_params("`extents` must be non-negative integers")
                        })
                    })
                    .collect::<Result<Vec<u64>, _>>()?,
            ),
            Some(_) => return Err(RpcError::invalid_params("`extents` must be an array")),
        };
        let idle = match self.0.remove("idle-for") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) if down => {
                Some(parse_duration(&text).map_err(RpcError::invalid_params)?)
            }
            Some(_) => {
                return Err(RpcError::invalid_params(
                    "`idle-for` is a duration string, for tier.demote",
                ))
            }
        };
        match (all, extents, idle) {
            (true, None, None) => Ok(Selection::All),
            (false, Some(list), None) => Ok(Selection::Extents(list)),
            (false, None, Some(idle)) => Ok(Selection::IdleFor(idle)),
            _ => Err(RpcError::invalid_params(
                "give exactly one of `all: true`, `extents` or `idle-for`",
            )),
        }
    }

    /// The remaining parameters as device options (strings, integers and booleans).
    fn rest_as_options(&mut self) -> Result<BTreeMap<String, String>, RpcError> {
        std::mem::take(&mut self.0)
            .into_iter()
            .map(|(key, value)| {
                let text = match value {
                    Value::String(s) => s,
                    Value::Bool(true) => "on".into(),
                    Value::Bool(false) => "off".into(),
                    Value::Number(n) if n.is_u64() => n.to_string(),
                    _ => {
                        return Err(RpcError::invalid_params(format!(
                            "`{key}` must be a string, a non-negative integer or a boolean"
                        )))
                    }
                };
                Ok((key, text))
            })
            .collect()
    }

    /// The remaining parameters as option changes: a value sets, `null` removes.
    fn rest_as_changes(&mut self) -> Result<BTreeMap<String, Option<String>>, RpcError> {
        let (nulls, values): (Map<String, Value>, Map<String, Value>) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|(_, v)| v.is_null());
        self.0 = values;
        let mut changes: BTreeMap<String, Option<String>> = self
            .rest_as_options()?
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        changes.extend(nulls.into_iter().map(|(k, _)| (k, None)));
        if changes.is_empty() {
            return Err(RpcError::invalid_params("nothing to change"));
        }
        Ok(changes)
    }

    fn finish(self) -> Result<(), RpcError> {
        match self.0.keys().next() {
            Some(key) => Err(RpcError::invalid_params(format!(
                "unknown parameter `{key}`"
            ))),
            None => Ok(()),
        }
    }
}
