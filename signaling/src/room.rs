//! Rooms: who is in them, the ring the server planned over them, and the requests flowing to
//! their starter. All state sits behind one mutex, held briefly by WebSocket handlers, API
//! handlers and a ticker; nothing awaits while holding it.
//!
//! A room forms a ring once it has `min_nodes` members: the planner orders them (trying each as
//! the starter), gives each a contiguous layer range within its memory budget at its measured
//! speed, and the server sends every member its assignment. The ring is ready when every
//! member has downloaded its layers, linked to its neighbours and said `ready`. Membership
//! changes re-plan: at once when a member of the ring leaves (its requests fail with a clear
//! error), at the next idle moment when a node joins (so no answer changes mid-way).
//!
//! A ring member that keeps sending its next node frames that node cannot use is reported by
//! it (`garbage`); past [`MAX_PEER_GARBAGE`] such frames the server believes the report about
//! the reporter's own previous node in the current ring, drops that node and re-plans without
//! it. (A member could accuse its neighbour falsely, but it can break the ring anyway by not
//! forwarding; the server trusts the members it admitted with the room token.)

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use mdi_core::plan::{plan_ring, ModelCost, Plan};
use mdi_core::SamplingParams;
use mdi_runtime::protocol::{
    Assignment, FinishReason, NodeId, NodeKind, NodeReport, Profile, ToNode, ToServer,
};
use tokio::sync::mpsc;

/// What planning needs to know about the served model.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    /// The id `/v1/models` lists.
    pub id: String,
    pub cost: ModelCost,
    /// The model's context: the most positions a sequence may hold.
    pub context: usize,
}

/// A member is dropped after this long without a message.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often members report.
pub const HEARTBEAT_MS: u64 = 1000;
/// Joins within this window are planned together.
const SETTLE: Duration = Duration::from_millis(600);
/// Malformed messages a member may send before it is dropped.
pub const MAX_BAD_MESSAGES: u32 = 20;
/// Unusable frames a ring member may send its next node (as that node reports) before it is
/// dropped from the room. A node that follows the protocol sends none.
pub const MAX_PEER_GARBAGE: u64 = 100;

/// Settings of every room.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Members needed before a ring forms.
    pub min_nodes: usize,
    /// Sequences in flight at once.
    pub in_flight: usize,
    /// Positions of KV cache the plan reserves per sequence in flight.
    pub reserve_positions: usize,
    /// Requests waiting for a ready ring, at most.
    pub max_queued: usize,
    /// How long a request may wait for a ready ring.
    pub queue_timeout: Duration,
    /// Element type of activations between nodes.
    pub wire: mdi_core::wire::WireDtype,
}

/// What the API hears about a request.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Tokens(Vec<u32>),
    Finished(FinishReason, Option<String>),
}

/// A request as the API hands it over.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt_tokens: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemberState {
    Joined,
    Assigned,
    Ready,
    /// Could not take its last assignment; left out of plans until it rejoins.
    Failed,
}

struct Member {
    name: String,
    kind: NodeKind,
    profile: Profile,
    tx: mpsc::UnboundedSender<ToNode>,
    last_seen: Instant,
    state: MemberState,
    report: NodeReport,
    /// Bytes done, in all, and taken from the node's own cache.
    progress: (u64, u64, u64),
    bad_messages: u32,
    failure: Option<String>,
}

struct Ring {
    epoch: u64,
    order: Vec<NodeId>,
    plan: Plan,
    ready: HashSet<NodeId>,
}

struct Active {
    tx: mpsc::UnboundedSender<StreamItem>,
}

struct Pending {
    id: u64,
    req: GenerateRequest,
    tx: mpsc::UnboundedSender<StreamItem>,
    since: Instant,
}

/// One room.
pub struct Room {
    pub name: String,
    members: BTreeMap<NodeId, Member>,
    ring: Option<Ring>,
    epoch: u64,
    /// A join or leave not planned yet, and when it happened.
    changed: Option<Instant>,
    /// Why the ring is not ready, for `/api/ring`.
    status: String,
    active: HashMap<u64, Active>,
    pending: VecDeque<Pending>,
}

impl Room {
    fn new(name: String) -> Self {
        Self {
            name,
            members: BTreeMap::new(),
            ring: None,
            epoch: 0,
            changed: None,
            status: "no nodes have joined".into(),
            active: HashMap::new(),
            pending: VecDeque::new(),
        }
    }

    fn is_ready(&self) -> bool {
        self.ring
            .as_ref()
            .is_some_and(|r| r.ready.len() == r.order.len())
    }

    fn send(&self, id: NodeId, msg: ToNode) {
        if let Some(m) = self.members.get(&id) {
            // A closed channel means the member is leaving; the leave cleans up.
            let _ = m.tx.send(msg);
        }
    }

    fn starter(&self) -> Option<NodeId> {
        self.ring.as_ref().and_then(|r| r.order.first().copied())
    }

    /// Fails every request sent to the ring of an older epoch.
    fn fail_active(&mut self, why: &str) {
        for (_, a) in self.active.drain() {
            let _ = a.tx.send(StreamItem::Finished(
                FinishReason::Error,
                Some(why.to_string()),
            ));
        }
    }

    /// Plans a ring over the members that can take part, and sends the assignments.
    /// The room's members changed: a node that failed (often because its neighbour went
    /// away mid-link) gets a place in the next plan again.
    fn retry_failed(&mut self) {
        for m in self.members.values_mut() {
            if m.state == MemberState::Failed {
                m.state = MemberState::Joined;
                m.failure = None;
            }
        }
    }

    fn replan(&mut self, cfg: &RoomConfig, model: &ModelFacts) {
        self.changed = None;
        // In name order: a device that reloads and rejoins (a new id, the same name) takes
        // the same place, and its cached layers still fit.
        let mut candidates: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| m.state != MemberState::Failed)
            .map(|(&id, _)| id)
            .collect();
        candidates.sort_by(|a, b| (&self.members[a].name, a).cmp(&(&self.members[b].name, b)));
        if !self.active.is_empty() {
            self.fail_active("the ring was re-formed while the request ran; send it again");
        }
        self.epoch += 1;
        let epoch = self.epoch;
        self.ring = None;
        // Nobody is part of a ring until the new plan says so.
        for m in self.members.values_mut() {
            if m.state != MemberState::Failed {
                m.state = MemberState::Joined;
            }
        }
        if candidates.len() < cfg.min_nodes.max(1) {
            self.status = format!(
                "waiting for nodes: {} of {} have joined",
                candidates.len(),
                cfg.min_nodes.max(1)
            );
            for id in candidates {
                self.send(
                    id,
                    ToNode::Unassigned {
                        epoch,
                        reason: self.status.clone(),
                    },
                );
            }
            return;
        }
        let profiles: Vec<_> = candidates
            .iter()
            .map(|id| self.members[id].profile.planner_profile())
            .collect();
        let kv_tokens = (cfg.in_flight * cfg.reserve_positions) as u64;
        let (order, plan) = match plan_ring(&model.cost, &profiles, kv_tokens) {
            Ok(p) => p,
            Err(e) => {
                self.status = format!("the ring cannot hold the model: {e}");
                for &id in &candidates {
                    self.send(
                        id,
                        ToNode::Unassigned {
                            epoch,
                            reason: self.status.clone(),
                        },
                    );
                }
                return;
            }
        };
        let order: Vec<NodeId> = order.into_iter().map(|i| candidates[i]).collect();
        let n = order.len();
        for (i, (&id, a)) in order.iter().zip(&plan.nodes).enumerate() {
            let m = &self.members[&id];
            let resident = (a.weight_bytes as f64 * m.profile.weight_factor) as u64;
            let assignment = Assignment {
                epoch,
                index: i as u32,
                n_nodes: n as u32,
                layers: [a.layers.start, a.layers.end],
                prev: (n > 1).then(|| order[(i + n - 1) % n]),
                next: (n > 1).then(|| order[(i + 1) % n]),
                manifest_url: "/model/manifest".into(),
                wire: cfg.wire,
                in_flight: cfg.in_flight,
                max_positions: model.context,
                kv_cap_bytes: m.profile.memory_budget.saturating_sub(resident),
            };
            self.send(id, ToNode::Assign(assignment));
        }
        for &id in &order {
            if let Some(m) = self.members.get_mut(&id) {
                m.state = MemberState::Assigned;
                m.progress = (0, 0, 0);
            }
        }
        for id in candidates.iter().filter(|id| !order.contains(id)) {
            self.send(
                *id,
                ToNode::Unassigned {
                    epoch,
                    reason: "not needed in this ring".into(),
                },
            );
        }
        self.status = format!("loading: {n} nodes are downloading their layers and linking");
        tracing::info!(
            "room `{}` epoch {epoch}: ring of {n}: {}",
            self.name,
            order
                .iter()
                .zip(&plan.nodes)
                .map(|(id, a)| format!("{}={:?}", self.members[id].name, a.layers))
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.ring = Some(Ring {
            epoch,
            order,
            plan,
            ready: HashSet::new(),
        });
    }

    /// Sends waiting requests to a ready starter; fails those waiting too long.
    fn dispatch(&mut self, cfg: &RoomConfig) {
        let now = Instant::now();
        while let Some(p) = self.pending.front() {
            if now.duration_since(p.since) <= cfg.queue_timeout {
                break;
            }
            if let Some(p) = self.pending.pop_front() {
                let _ = p.tx.send(StreamItem::Finished(
                    FinishReason::Error,
                    Some(format!(
                        "no ready ring within {} s: {}",
                        cfg.queue_timeout.as_secs(),
                        self.status
                    )),
                ));
            }
        }
        if !self.is_ready() {
            return;
        }
        let Some(starter) = self.starter() else {
            return;
        };
        while let Some(p) = self.pending.pop_front() {
            self.send(
                starter,
                ToNode::Generate {
                    request: p.id,
                    prompt_tokens: p.req.prompt_tokens,
                    max_tokens: p.req.max_tokens,
                    sampling: p.req.sampling,
                    eos_ids: p.req.eos_ids,
                },
            );
            self.active.insert(p.id, Active { tx: p.tx });
        }
    }
}

/// Every room of the server.
pub struct Hub {
    pub config: RoomConfig,
    rooms: HashMap<String, Room>,
    next_node: NodeId,
    next_request: u64,
}

/// One node as `/api/ring` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub kind: NodeKind,
    pub role: Option<&'static str>,
    pub layers: Option<[usize; 2]>,
    pub state: &'static str,
    pub backend: String,
    pub adapter: String,
    pub tok_s: f64,
    pub rtt_ms: Option<f64>,
    /// Bytes of weights the node's engine holds, as it reports them.
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub rss_bytes: Option<u64>,
    pub memory_budget: u64,
    /// The planner's share of stored weight bytes.
    pub planned_weight_bytes: Option<u64>,
    /// Model file bytes this server sent to the node (counted here, not reported).
    pub downloaded_bytes: u64,
    /// Bytes of the assignment done, in all, and found in the node's own cache.
    pub download: [u64; 3],
    pub speed_gmacs: f64,
    pub failure: Option<String>,
}

/// `/api/ring`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RingView {
    pub room: String,
    pub ready: bool,
    pub epoch: u64,
    pub status: String,
    pub model: String,
    pub nodes: Vec<NodeView>,
    pub sequences: SequencesView,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SequencesView {
    pub in_flight: usize,
    pub queued: usize,
    pub peak_in_flight: usize,
    pub requests_active: usize,
    pub requests_waiting: usize,
}

impl Hub {
    pub fn new(config: RoomConfig) -> Self {
        Self {
            config,
            rooms: HashMap::new(),
            next_node: 1,
            next_request: 1,
        }
    }

    /// Adds a member; returns its id.
    pub fn join(
        &mut self,
        room: &str,
        name: String,
        kind: NodeKind,
        profile: Profile,
        tx: mpsc::UnboundedSender<ToNode>,
    ) -> NodeId {
        let id = self.next_node;
        self.next_node += 1;
        let r = self
            .rooms
            .entry(room.to_string())
            .or_insert_with(|| Room::new(room.to_string()));
        tracing::info!(
            "room `{room}`: node {id} `{name}` joined ({:?}, {}, {:.2} GMAC/s, budget {} MB)",
            kind,
            profile.backend,
            profile.speed / 1e9,
            profile.memory_budget >> 20
        );
        let _ = tx.send(ToNode::Welcome {
            id,
            room: room.to_string(),
            heartbeat_ms: HEARTBEAT_MS,
        });
        r.members.insert(
            id,
            Member {
                name,
                kind,
                profile,
                tx,
                last_seen: Instant::now(),
                state: MemberState::Joined,
                report: NodeReport::default(),
                progress: (0, 0, 0),
                bad_messages: 0,
                failure: None,
            },
        );
        r.retry_failed();
        r.changed = Some(Instant::now());
        id
    }

    /// Removes a member (it left, its connection closed, or it went silent).
    pub fn leave(&mut self, room: &str, id: NodeId, why: &str, model: &ModelFacts) {
        let cfg = self.config.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(m) = r.members.remove(&id) else {
            return;
        };
        tracing::info!("room `{room}`: node {id} `{}` left: {why}", m.name);
        r.retry_failed();
        let in_ring = r.ring.as_ref().is_some_and(|g| g.order.contains(&id));
        if in_ring {
            // The ring is broken: plan again over who is left.
            r.replan(&cfg, model);
        } else {
            r.changed = Some(Instant::now());
        }
    }

    /// A malformed message from a member; returns whether to drop it.
    pub fn bad_message(&mut self, room: &str, id: NodeId, error: &str) -> bool {
        let Some(m) = self
            .rooms
            .get_mut(room)
            .and_then(|r| r.members.get_mut(&id))
        else {
            return true;
        };
        m.bad_messages += 1;
        let _ = m.tx.send(ToNode::Error {
            message: error.to_string(),
        });
        m.bad_messages > MAX_BAD_MESSAGES
    }

    /// Plans every room with unplanned joins now instead of after they settle (for tests and
    /// the fuzz harness, which need a formed ring without waiting).
    pub fn plan_now(&mut self, model: &ModelFacts) {
        let cfg = self.config.clone();
        for r in self.rooms.values_mut().filter(|r| r.changed.is_some()) {
            r.replan(&cfg, model);
        }
    }

    /// Whether `id` is still a member of `room` (a dropped node's connection ends).
    pub fn is_member(&self, room: &str, id: NodeId) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|r| r.members.contains_key(&id))
    }

    /// A message from member `id`.
    pub fn handle(&mut self, room: &str, id: NodeId, msg: ToServer, model: &ModelFacts) {
        if msg == ToServer::Leave {
            self.leave(room, id, "it left", model);
            return;
        }
        let cfg = self.config.clone();
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let Some(m) = r.members.get_mut(&id) else {
            return;
        };
        m.last_seen = Instant::now();
        let epoch = r.ring.as_ref().map(|g| g.epoch);
        // A member to drop once the room is no longer borrowed, and why.
        let mut drop_member: Option<(NodeId, String)> = None;
        match msg {
            ToServer::Join { .. } => {
                let _ = m.tx.send(ToNode::Error {
                    message: "already joined".into(),
                });
            }
            ToServer::Stats(report) => m.report = report,
            ToServer::Progress {
                epoch: e,
                done,
                total,
                cached,
            } => {
                if Some(e) == epoch {
                    m.progress = (done, total, cached);
                }
            }
            ToServer::Ready { epoch: e } => {
                if Some(e) == epoch {
                    m.state = MemberState::Ready;
                    if let Some(g) = r.ring.as_mut() {
                        g.ready.insert(id);
                    }
                    if r.is_ready() {
                        r.status = "ready".into();
                        tracing::info!("room `{room}` epoch {e}: the ring is ready");
                        r.dispatch(&cfg);
                    }
                }
            }
            ToServer::Failed { epoch: e, message } => {
                if Some(e) == epoch {
                    tracing::warn!("room `{room}`: node {id} failed epoch {e}: {message}");
                    m.state = MemberState::Failed;
                    m.failure = Some(message);
                    r.replan(&cfg, model);
                }
            }
            ToServer::Signal { to, signal } => {
                if r.members.contains_key(&to) {
                    r.send(to, ToNode::Signal { from: id, signal });
                } else {
                    r.send(
                        id,
                        ToNode::Error {
                            message: format!("no node {to} in room `{room}` to signal"),
                        },
                    );
                }
            }
            ToServer::Tokens { request, tokens } => {
                if r.starter() == Some(id) {
                    if let Some(a) = r.active.get(&request) {
                        let _ = a.tx.send(StreamItem::Tokens(tokens));
                    }
                }
            }
            ToServer::Finished {
                request,
                finish,
                message,
            } => {
                if r.starter() == Some(id) {
                    if let Some(a) = r.active.remove(&request) {
                        let _ = a.tx.send(StreamItem::Finished(finish, message));
                    }
                }
            }
            ToServer::Garbage {
                epoch: e,
                from,
                count,
                example,
            } => {
                // Only about the reporter's own previous node in the current ring.
                let prev = r.ring.as_ref().filter(|g| g.epoch == e).and_then(|g| {
                    let n = g.order.len();
                    let i = g.order.iter().position(|&o| o == id)?;
                    (n > 1).then(|| g.order[(i + n - 1) % n])
                });
                if prev != Some(from) {
                    r.send(
                        id,
                        ToNode::Error {
                            message: format!(
                                "node {from} is not your previous node in epoch {e}; report ignored"
                            ),
                        },
                    );
                } else {
                    let example = mdi_core::wire::truncate(&example, 200);
                    tracing::warn!(
                        "room `{room}`: node {id} reports {count} unusable frames from node \
                         {from} (last: {example})"
                    );
                    if count >= MAX_PEER_GARBAGE {
                        drop_member = Some((
                            from,
                            format!(
                                "it sent {count} unusable frames to node {id} (last: {example})"
                            ),
                        ));
                    }
                }
            }
            ToServer::Leave => {}
        }
        if let Some((victim, why)) = drop_member {
            if let Some(r) = self.rooms.get(room) {
                r.send(
                    victim,
                    ToNode::Error {
                        message: format!("dropped from room `{room}`: {why}"),
                    },
                );
            }
            // Its channel goes with it: the connection closes and the ring re-forms.
            self.leave(room, victim, &why, model);
        }
    }

    /// Queues a generation request in `room`; its tokens arrive on the returned channel.
    pub fn submit(
        &mut self,
        room: &str,
        req: GenerateRequest,
    ) -> Result<(u64, mpsc::UnboundedReceiver<StreamItem>), String> {
        let cfg = self.config.clone();
        let id = self.next_request;
        self.next_request += 1;
        let r = self
            .rooms
            .entry(room.to_string())
            .or_insert_with(|| Room::new(room.to_string()));
        if r.pending.len() >= cfg.max_queued {
            return Err(format!(
                "{} requests are already waiting for the ring; try again later",
                r.pending.len()
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        r.pending.push_back(Pending {
            id,
            req,
            tx,
            since: Instant::now(),
        });
        r.dispatch(&cfg);
        Ok((id, rx))
    }

    /// The client of request `id` is gone (or a stop string matched): stop it everywhere.
    pub fn cancel(&mut self, room: &str, id: u64) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.pending.retain(|p| p.id != id);
        if r.active.remove(&id).is_some() {
            if let Some(s) = r.starter() {
                r.send(s, ToNode::Cancel { request: id });
            }
        }
    }

    /// Periodic work: drop silent members, plan settled joins, expire waiting requests.
    pub fn tick(&mut self, model: &ModelFacts) {
        let cfg = self.config.clone();
        let now = Instant::now();
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for name in rooms {
            let silent: Vec<NodeId> = self.rooms[&name]
                .members
                .iter()
                .filter(|(_, m)| now.duration_since(m.last_seen) > HEARTBEAT_TIMEOUT)
                .map(|(&id, _)| id)
                .collect();
            for id in silent {
                self.leave(&name, id, "no heartbeat", model);
            }
            let Some(r) = self.rooms.get_mut(&name) else {
                continue;
            };
            if let Some(t) = r.changed {
                // Joins wait for the ring to be idle, so no answer changes mid-way.
                let idle = r.active.is_empty();
                if now.duration_since(t) >= SETTLE && (idle || r.ring.is_none()) {
                    r.replan(&cfg, model);
                }
            }
            r.dispatch(&cfg);
            if r.members.is_empty() && r.pending.is_empty() && r.active.is_empty() {
                self.rooms.remove(&name);
            }
        }
    }

    /// What `/api/ring` shows for `room`; `served` tells the model bytes sent to a node.
    pub fn view(&self, room: &str, model: &ModelFacts, served: &dyn Fn(NodeId) -> u64) -> RingView {
        let Some(r) = self.rooms.get(room) else {
            return RingView {
                room: room.to_string(),
                ready: false,
                epoch: 0,
                status: "no nodes have joined".into(),
                model: model.id.clone(),
                nodes: Vec::new(),
                sequences: SequencesView {
                    in_flight: 0,
                    queued: 0,
                    peak_in_flight: 0,
                    requests_active: 0,
                    requests_waiting: 0,
                },
            };
        };
        let position = |id: NodeId| {
            r.ring
                .as_ref()
                .and_then(|g| g.order.iter().position(|&o| o == id).map(|i| (i, g)))
        };
        let mut nodes: Vec<(usize, NodeView)> = r
            .members
            .iter()
            .map(|(&id, m)| {
                let at = position(id);
                let view = NodeView {
                    id,
                    name: m.name.clone(),
                    kind: m.kind,
                    role: at.map(|(i, _)| if i == 0 { "starter" } else { "secondary" }),
                    layers: at.map(|(i, g)| {
                        let l = &g.plan.nodes[i].layers;
                        [l.start, l.end]
                    }),
                    state: match m.state {
                        MemberState::Joined => "joined",
                        MemberState::Assigned => "loading",
                        MemberState::Ready => "ready",
                        MemberState::Failed => "failed",
                    },
                    backend: m.profile.backend.clone(),
                    adapter: m.profile.adapter.clone(),
                    tok_s: m.report.tok_s,
                    rtt_ms: m.report.rtt_ms,
                    weight_bytes: m.report.weight_bytes,
                    kv_bytes: m.report.kv_bytes,
                    rss_bytes: m.report.rss_bytes,
                    memory_budget: m.profile.memory_budget,
                    planned_weight_bytes: at.map(|(i, g)| g.plan.nodes[i].weight_bytes),
                    downloaded_bytes: served(id),
                    download: [m.progress.0, m.progress.1, m.progress.2],
                    speed_gmacs: m.profile.speed / 1e9,
                    failure: m.failure.clone(),
                };
                (at.map_or(usize::MAX, |(i, _)| i), view)
            })
            .collect();
        nodes.sort_by_key(|(i, v)| (*i, v.id));
        let starter = r.starter().and_then(|s| r.members.get(&s));
        RingView {
            room: r.name.clone(),
            ready: r.is_ready(),
            epoch: r.epoch,
            status: r.status.clone(),
            model: model.id.clone(),
            nodes: nodes.into_iter().map(|(_, v)| v).collect(),
            sequences: SequencesView {
                in_flight: starter.map_or(0, |m| m.report.sequences),
                queued: starter.map_or(0, |m| m.report.queued),
                peak_in_flight: starter.map_or(0, |m| m.report.peak_sequences),
                requests_active: r.active.len(),
                requests_waiting: r.pending.len(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(budget: u64) -> Profile {
        Profile {
            memory_budget: budget,
            backend: "cpu".into(),
            adapter: "test".into(),
            speed: 1e9,
            weight_factor: 1.0,
        }
    }

    #[test]
    fn rooms_plan_when_enough_nodes_join_and_route_requests_to_the_starter() {
        let model = ModelFacts {
            id: "tiny".into(),
            cost: ModelCost {
                layer_weight_bytes: vec![100; 4],
                kv_bytes_per_token: 8,
                layer_work: vec![1.0; 4],
                starter_weight_bytes: 50,
                starter_work: 1.0,
            },
            context: 64,
        };
        let none = |_| 0;
        let cfg = RoomConfig {
            min_nodes: 2,
            in_flight: 4,
            reserve_positions: 16,
            max_queued: 8,
            queue_timeout: Duration::from_secs(60),
            wire: mdi_core::wire::WireDtype::F16,
        };
        let mut hub = Hub::new(cfg);
        let (a_tx, mut a_rx) = mpsc::unbounded_channel();
        let (b_tx, mut b_rx) = mpsc::unbounded_channel();
        let a = hub.join("r", "a".into(), NodeKind::Native, profile(1 << 30), a_tx);
        let b = hub.join("r", "b".into(), NodeKind::Native, profile(1 << 30), b_tx);
        assert!(matches!(a_rx.try_recv(), Ok(ToNode::Welcome { .. })));
        assert!(matches!(b_rx.try_recv(), Ok(ToNode::Welcome { .. })));
        // A request before the ring exists waits.
        let (req, mut out) = hub
            .submit(
                "r",
                GenerateRequest {
                    prompt_tokens: vec![1, 2],
                    max_tokens: 3,
                    sampling: SamplingParams::default(),
                    eos_ids: vec![],
                },
            )
            .unwrap();
        hub.rooms.get_mut("r").unwrap().changed = Some(Instant::now() - SETTLE);
        hub.tick(&model);
        let (Ok(ToNode::Assign(x)), Ok(ToNode::Assign(y))) = (a_rx.try_recv(), b_rx.try_recv())
        else {
            panic!("both assigned");
        };
        assert_eq!(x.epoch, y.epoch);
        assert_eq!(x.n_nodes, 2);
        let (starter, other) = if x.index == 0 { (a, b) } else { (b, a) };
        let starter_rx = if x.index == 0 { &mut a_rx } else { &mut b_rx };
        for id in [a, b] {
            hub.handle("r", id, ToServer::Ready { epoch: x.epoch }, &model);
        }
        assert!(hub.view("r", &model, &none).ready);
        let Ok(ToNode::Generate { request, .. }) = starter_rx.try_recv() else {
            panic!("the starter got the request");
        };
        assert_eq!(request, req);
        assert_eq!(hub.view("r", &model, &none).sequences.requests_active, 1);
        // Only the starter's tokens count.
        hub.handle(
            "r",
            other,
            ToServer::Tokens {
                request,
                tokens: vec![9],
            },
            &model,
        );
        hub.handle(
            "r",
            starter,
            ToServer::Tokens {
                request,
                tokens: vec![5],
            },
            &model,
        );
        assert_eq!(out.try_recv(), Ok(StreamItem::Tokens(vec![5])));
        assert!(out.try_recv().is_err());
        // A ring member leaving fails the request with a clear error and re-plans.
        hub.leave("r", other, "test", &model);
        match out.try_recv() {
            Ok(StreamItem::Finished(FinishReason::Error, Some(m))) => {
                assert!(m.contains("re-formed"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let v = hub.view("r", &model, &none);
        assert!(!v.ready);
        assert!(v.status.contains("waiting for nodes"), "{}", v.status);
    }

    /// A six-layer model and a room that forms rings of three.
    fn three_node_room() -> (ModelFacts, Hub) {
        let model = ModelFacts {
            id: "tiny".into(),
            cost: ModelCost {
                layer_weight_bytes: vec![100; 6],
                kv_bytes_per_token: 8,
                layer_work: vec![1.0; 6],
                starter_weight_bytes: 50,
                starter_work: 1.0,
            },
            context: 64,
        };
        let cfg = RoomConfig {
            min_nodes: 3,
            in_flight: 2,
            reserve_positions: 16,
            max_queued: 8,
            queue_timeout: Duration::from_secs(60),
            wire: mdi_core::wire::WireDtype::F16,
        };
        (model, Hub::new(cfg))
    }

    #[test]
    fn a_node_reported_for_garbage_by_its_next_node_is_dropped() {
        let (model, mut hub) = three_node_room();
        let mut rxs = Vec::new();
        let mut ids = Vec::new();
        for name in ["a", "b", "c"] {
            let (tx, rx) = mpsc::unbounded_channel();
            ids.push(hub.join("r", name.into(), NodeKind::Native, profile(1 << 30), tx));
            rxs.push(rx);
        }
        hub.rooms.get_mut("r").unwrap().changed = Some(Instant::now() - SETTLE);
        hub.tick(&model);
        let mut assigned = Vec::new();
        for (rx, &id) in rxs.iter_mut().zip(&ids) {
            let _welcome = rx.try_recv();
            let Ok(ToNode::Assign(a)) = rx.try_recv() else {
                panic!("assigned")
            };
            assigned.push((id, a));
        }
        let epoch = assigned[0].1.epoch;
        let (reporter, a) = &assigned[0];
        let prev = a.prev.expect("a ring of three");
        let other = assigned
            .iter()
            .map(|(id, _)| *id)
            .find(|&i| i != prev && i != *reporter);
        let other = other.unwrap();
        let garbage = |from, count| ToServer::Garbage {
            epoch,
            from,
            count,
            example: "unknown message kind 7".into(),
        };
        // About a node that is not the reporter's previous one: ignored, with a reason.
        hub.handle("r", *reporter, garbage(other, 1000), &model);
        assert!(hub.is_member("r", other));
        let rx = &mut rxs[ids.iter().position(|i| i == reporter).unwrap()];
        let mut saw = false;
        while let Ok(m) = rx.try_recv() {
            saw |= matches!(m, ToNode::Error { message } if message.contains("not your previous"));
        }
        assert!(saw, "the false report is answered");
        // Below the limit the previous node stays; at it, it is dropped and the ring re-forms.
        hub.handle("r", *reporter, garbage(prev, MAX_PEER_GARBAGE - 1), &model);
        assert!(hub.is_member("r", prev));
        hub.handle("r", *reporter, garbage(prev, MAX_PEER_GARBAGE), &model);
        assert!(!hub.is_member("r", prev), "dropped");
        let rx = &mut rxs[ids.iter().position(|&i| i == prev).unwrap()];
        let mut told = None;
        while let Ok(m) = rx.try_recv() {
            if let ToNode::Error { message } = m {
                told = Some(message);
            }
        }
        let told = told.expect("the dropped node is told why");
        assert!(
            told.contains("dropped") && told.contains("unusable frames"),
            "{told}"
        );
        let v = hub.view("r", &model, &|_| 0);
        assert_eq!(v.nodes.len(), 2);
        assert!(v.status.contains("waiting for nodes"), "{}", v.status);
    }

    #[test]
    fn a_node_that_failed_with_its_neighbour_is_planned_again_when_members_change() {
        let (model, mut hub) = three_node_room();
        let mut rxs = Vec::new();
        let mut join = |hub: &mut Hub, name: &str| {
            let (tx, rx) = mpsc::unbounded_channel();
            rxs.push(rx);
            hub.join("r", name.into(), NodeKind::Browser, profile(1 << 30), tx)
        };
        let ids: Vec<NodeId> = ["a", "b", "c"].iter().map(|n| join(&mut hub, n)).collect();
        hub.rooms.get_mut("r").unwrap().changed = Some(Instant::now() - SETTLE);
        hub.tick(&model);
        let epoch = hub.rooms["r"].epoch;
        for &id in &ids {
            hub.handle("r", id, ToServer::Ready { epoch }, &model);
        }
        assert!(hub.view("r", &model, &|_| 0).ready);
        // `b` reloads: `a` sees its link close and fails first, then `b` leaves and comes back.
        hub.handle(
            "r",
            ids[0],
            ToServer::Failed {
                epoch,
                message: "the link from the previous node closed".into(),
            },
            &model,
        );
        hub.leave("r", ids[1], "it left", &model);
        let b2 = join(&mut hub, "b");
        hub.rooms.get_mut("r").unwrap().changed = Some(Instant::now() - SETTLE);
        hub.tick(&model);
        let r = &hub.rooms["r"];
        let ring = r.ring.as_ref().expect("a new ring of three");
        for id in [ids[0], ids[2], b2] {
            assert!(ring.order.contains(&id), "node {id} is in {:?}", ring.order);
        }
    }
}
