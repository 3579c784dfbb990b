//! Rooms: who is in them, the ring the server planned over them, and the requests flowing to
//! their starter. All state sits behind one mutex, held briefly by WebSocket handlers, API
//! handlers and a ticker; nothing awaits while holding it.
//!
//! A room forms a ring once it has `min_nodes` members: the planner orders them (trying each as
//! the starter), gives each a contiguous layer range within its memory budget at its measured
//! speed, and the server sends every member its assignment. The ring is ready when every
//! member has downloaded its layers, linked to its neighbours and said `ready`. Membership
//! changes re-plan: at once when a member of the ring leaves, at the next idle moment when a
//! node joins (or after [`JOIN_WAIT`] of steady traffic).
//!
//! Requests survive a re-plan. The room keeps each request's prompt and the tokens already
//! sent to its client; when the ring breaks (a member leaves, goes silent or fails, the
//! starter included), the request goes back to the front of the queue, and once a ring is
//! ready again its starter gets the prompt followed by those tokens as one prompt, which every
//! node prefills into the KV cache of its new layers, and generation goes on from there. The
//! client sees a pause, never a repeated or a missing token; with greedy decoding the answer is
//! the undisturbed one, and a seeded sampler resumes its random stream where it stopped. If the
//! members left cannot hold the model, requests wait (the status says why) until enough memory
//! joins or their queue deadline passes.
//!
//! A ring member that keeps sending its next node frames that node cannot use is reported by
//! it (`garbage`); past [`MAX_PEER_GARBAGE`] such frames the server believes the report about
//! the reporter's own previous node in the current ring, drops that node and re-plans without
//! it. (A member could accuse its neighbour falsely, but it can break the ring anyway by not
//! forwarding; the server trusts the members it admitted with the room token.)

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use mdi_core::plan::{plan_ring, ModelCost, NodeProfile, Plan};
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

/// A native member of a ready ring is dropped after this long without a message: a node that
/// loses its network is noticed within this (plus one tick), and its requests resume.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(2500);
/// The same for a browser member of a ready ring: a tab that computes on its own thread (the
/// CPU engine without worker threads) cannot answer while one long prefill step runs, and
/// a hidden tab's timers fire at most once a second. A closed tab closes its WebSocket and is
/// noticed at once either way.
pub const BROWSER_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(6);
/// The same for a member that is not serving yet (loading its layers blocks a tab).
pub const LOADING_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often members report.
pub const HEARTBEAT_MS: u64 = 500;
/// A node that joins while requests run waits for an idle ring, but no longer than this:
/// then the ring re-forms with it and the running requests resume on the new ring.
pub const JOIN_WAIT: Duration = Duration::from_secs(30);
/// How many times one request may be resumed after its ring broke before it fails (a
/// request that breaks every ring it runs on must not stall the room forever).
pub const MAX_RESUMES: u32 = 8;
/// Joins within this window are planned together.
const SETTLE: Duration = Duration::from_millis(600);
/// A ring is rebalanced (with `rebalance` on) once its busiest stage has spent this long
/// computing since the ring was ready: enough steps that the busy times are the stages' costs.
pub const REBALANCE_AFTER_BUSY: Duration = Duration::from_secs(4);
/// Rebalances between two changes of membership; each re-plans from the last ring's figures.
pub const MAX_REBALANCES: u32 = 2;
/// A rebalance is worth its reload when the new plan's busiest stage is this much faster.
const REBALANCE_GAIN: f64 = 0.95;
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
    /// Re-plan a ready ring from its nodes' measured busy times (see [`Room::rebalance`]).
    pub rebalance: bool,
}

impl RoomConfig {
    /// KV positions a plan reserves on every node: sequences in flight × positions each.
    fn kv_tokens(&self) -> u64 {
        (self.in_flight * self.reserve_positions) as u64
    }
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
    /// The node's busy seconds when its ring was first seen ready: (epoch, seconds).
    busy_from: Option<(u64, f64)>,
}

impl Member {
    /// How long this member may stay silent before it is dropped.
    fn heartbeat_timeout(&self) -> Duration {
        match (self.state, self.kind) {
            (MemberState::Ready, NodeKind::Browser) => BROWSER_HEARTBEAT_TIMEOUT,
            (MemberState::Ready, _) => HEARTBEAT_TIMEOUT,
            _ => LOADING_HEARTBEAT_TIMEOUT,
        }
    }
}

struct Ring {
    epoch: u64,
    order: Vec<NodeId>,
    plan: Plan,
    ready: HashSet<NodeId>,
}

/// A request the room holds from submission to its end, across re-formed rings.
struct Job {
    /// The id the API knows it by.
    id: u64,
    req: GenerateRequest,
    /// Tokens already sent to the client.
    generated: Vec<u32>,
    tx: mpsc::UnboundedSender<StreamItem>,
    /// When it started waiting (for the queue deadline).
    since: Instant,
    /// Times it went back to the queue because its ring broke.
    resumes: u32,
}

/// Recovery figures of a room, for `/api/ring`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RecoveryView {
    /// Times a ring broke while requests ran on it.
    pub breaks: u64,
    /// Requests that went back to the queue to resume on the next ring.
    pub resumed: u64,
    /// Tokens (prompt and generated) the resumed requests prefilled again.
    pub replayed_tokens: u64,
    /// Requests that failed because they could not be resumed.
    pub failed: u64,
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
    /// Requests sent to the starter, by the id they were sent under (a resumed request gets a
    /// new one, so late tokens of its old run are told apart).
    active: HashMap<u64, Job>,
    pending: VecDeque<Job>,
    next_dispatch: u64,
    /// Whether a ring was ever planned: `min_nodes` gates only the first one; after that the
    /// room re-forms over whoever is left.
    formed: bool,
    recovery: RecoveryView,
    /// Speeds measured in the last ring (work per busy second), by node, for a rebalance;
    /// cleared when members come or go (a self-benchmark's figures are in other units).
    measured: HashMap<NodeId, f64>,
    /// Rebalances since the members last changed.
    rebalances: u32,
    /// The next plan is a rebalance: it keeps `measured`.
    rebalancing: bool,
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
            next_dispatch: 1,
            formed: false,
            recovery: RecoveryView::default(),
            measured: HashMap::new(),
            rebalances: 0,
            rebalancing: false,
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

    /// The ring broke: every request it was running goes back to the front of the queue, in
    /// the order they came, to resume on the next ring.
    fn requeue_active(&mut self) {
        if self.active.is_empty() {
            return;
        }
        self.recovery.breaks += 1;
        let mut jobs: Vec<Job> = self.active.drain().map(|(_, j)| j).collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.id));
        let now = Instant::now();
        for mut j in jobs {
            if j.resumes >= MAX_RESUMES {
                self.recovery.failed += 1;
                let _ = j.tx.send(StreamItem::Finished(
                    FinishReason::Error,
                    Some(format!(
                        "the ring broke {} times while this request ran; giving up",
                        j.resumes + 1
                    )),
                ));
                continue;
            }
            j.resumes += 1;
            j.since = now;
            self.recovery.resumed += 1;
            tracing::info!(
                "room `{}`: request {} resumes on the next ring after {} tokens",
                self.name,
                j.id,
                j.generated.len()
            );
            self.pending.push_front(j);
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
        if !std::mem::take(&mut self.rebalancing) {
            self.measured.clear();
            self.rebalances = 0;
        }
        // In name order: a device that reloads and rejoins (a new id, the same name) takes
        // the same place, and its cached layers still fit.
        let mut candidates: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| m.state != MemberState::Failed)
            .map(|(&id, _)| id)
            .collect();
        candidates.sort_by(|a, b| (&self.members[a].name, a).cmp(&(&self.members[b].name, b)));
        self.requeue_active();
        self.epoch += 1;
        let epoch = self.epoch;
        self.ring = None;
        // Nobody is part of a ring until the new plan says so.
        for m in self.members.values_mut() {
            if m.state != MemberState::Failed {
                m.state = MemberState::Joined;
            }
        }
        let needed = if self.formed { 1 } else { cfg.min_nodes.max(1) };
        if candidates.len() < needed {
            self.status = format!(
                "waiting for nodes: {} of {needed} have joined",
                candidates.len(),
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
        // Measured speeds only when every candidate has one: they are not in a self-benchmark's
        // units.
        let measured = candidates.iter().all(|id| self.measured.contains_key(id));
        let profiles = self.planner_profiles(&candidates, measured.then_some(&self.measured));
        let (order, plan) = match plan_ring(&model.cost, &profiles, cfg.kv_tokens()) {
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
        self.formed = true;
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

    /// The planner's view of members `ids`, with the speeds in `speeds` where given.
    fn planner_profiles(
        &self,
        ids: &[NodeId],
        speeds: Option<&HashMap<NodeId, f64>>,
    ) -> Vec<NodeProfile> {
        ids.iter()
            .map(|id| {
                let mut p = self.members[id].profile.planner_profile();
                if let Some(&s) = speeds.and_then(|m| m.get(id)) {
                    p.speed = s;
                }
                p
            })
            .collect()
    }

    /// Every node of a ring runs the same tokens, so the busy seconds each has spent since the
    /// ring was ready are the real costs of their stages: a self-benchmark of one layer, taken
    /// while the machine did other things, can be far off, and the LM head costs more per
    /// multiply-add than a layer when it is stored in a wider format. Once the busiest stage
    /// has been busy [`REBALANCE_AFTER_BUSY`], each node's measured speed (its stage's work
    /// per busy second) goes to the planner; if the new plan's busiest stage would be at
    /// least 5% faster, the ring is planned again (when idle, as for a join). At most
    /// [`MAX_REBALANCES`] times between changes of membership.
    fn rebalance(&mut self, cfg: &RoomConfig, model: &ModelFacts) {
        if self.changed.is_some() || self.rebalances >= MAX_REBALANCES || !self.is_ready() {
            return;
        }
        let Some(ring) = &self.ring else { return };
        let n = ring.order.len();
        let everyone_in_it = self
            .members
            .iter()
            .all(|(id, m)| m.state == MemberState::Failed || ring.order.contains(id));
        if n < 2 || !everyone_in_it {
            return;
        }
        // (busy seconds, multiply-adds per token) of each stage.
        let mut stages = Vec::with_capacity(n);
        for (i, (id, a)) in ring.order.iter().zip(&ring.plan.nodes).enumerate() {
            let m = &self.members[id];
            let Some((e, from)) = m.busy_from else { return };
            if e != ring.epoch || m.report.epoch != ring.epoch {
                return;
            }
            let layers = model.cost.layer_work.get(a.layers.clone()).unwrap_or(&[]);
            let mut work: f64 = layers.iter().sum();
            if i == 0 {
                work += model.cost.starter_work;
            }
            stages.push(((m.report.busy_s - from).max(0.0), work));
        }
        let busiest = stages.iter().map(|s| s.0).fold(0.0, f64::max);
        if busiest < REBALANCE_AFTER_BUSY.as_secs_f64() || stages.iter().any(|s| s.0 <= 0.0) {
            return;
        }
        let measured: HashMap<NodeId, f64> = ring
            .order
            .iter()
            .zip(&stages)
            .map(|(&id, &(busy, work))| (id, work / busy))
            .collect();
        let profiles = self.planner_profiles(&ring.order, Some(&measured));
        // Seconds per token in the measured units: the busiest stage's busy time now.
        let Ok((_, plan)) = plan_ring(&model.cost, &profiles, cfg.kv_tokens()) else {
            return;
        };
        self.rebalances += 1;
        let summary = ring
            .order
            .iter()
            .zip(&stages)
            .map(|(id, (busy, _))| format!("{} {busy:.1} s", self.members[id].name))
            .collect::<Vec<_>>()
            .join(", ");
        if plan.bottleneck > REBALANCE_GAIN * busiest {
            tracing::info!(
                "room `{}` epoch {}: stages busy {summary}; a new plan would gain too little",
                self.name,
                ring.epoch
            );
            // Measured once: the same ring stays; the next membership change measures again.
            self.rebalances = MAX_REBALANCES;
            return;
        }
        tracing::info!(
            "room `{}` epoch {}: stages busy {summary}; planning again from these speeds \
             (busiest stage {:.0}% of now)",
            self.name,
            ring.epoch,
            100.0 * plan.bottleneck / busiest
        );
        self.measured = measured;
        self.rebalancing = true;
        self.changed = Some(Instant::now() - SETTLE);
    }

    /// Sends waiting requests to a ready starter; fails those waiting too long.
    fn dispatch(&mut self, cfg: &RoomConfig) {
        let now = Instant::now();
        let status = self.status.clone();
        self.pending.retain(|j| {
            if now.duration_since(j.since) <= cfg.queue_timeout {
                return true;
            }
            let _ = j.tx.send(StreamItem::Finished(
                FinishReason::Error,
                Some(format!(
                    "no ready ring within {} s: {status}",
                    cfg.queue_timeout.as_secs()
                )),
            ));
            false
        });
        if !self.is_ready() {
            return;
        }
        let Some(starter) = self.starter() else {
            return;
        };
        while let Some(j) = self.pending.pop_front() {
            // A resumed request whose end was already reached (its last token, or the
            // finish, was lost with the ring) ends here.
            let left = j.req.max_tokens.saturating_sub(j.generated.len());
            let ended = match j.generated.last() {
                Some(t) if j.req.eos_ids.contains(t) => Some(FinishReason::Eos),
                _ if left == 0 => Some(FinishReason::MaxTokens),
                _ => None,
            };
            if let Some(f) = ended {
                let _ = j.tx.send(StreamItem::Finished(f, None));
                continue;
            }
            let mut prompt_tokens = j.req.prompt_tokens.clone();
            prompt_tokens.extend_from_slice(&j.generated);
            if j.resumes > 0 {
                self.recovery.replayed_tokens += prompt_tokens.len() as u64;
            }
            let request = self.next_dispatch;
            self.next_dispatch += 1;
            self.send(
                starter,
                ToNode::Generate {
                    request,
                    prompt_tokens,
                    max_tokens: left,
                    // A seeded sampler goes on with the draws it has not made yet.
                    sampling: j.req.sampling.resumed_after(j.generated.len()),
                    eos_ids: j.req.eos_ids.clone(),
                },
            );
            self.active.insert(request, j);
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
    /// A browser node's WebAssembly memory, as it reports it (tabs have no RSS).
    pub wasm_memory_bytes: Option<u64>,
    pub memory_budget: u64,
    /// The planner's share of stored weight bytes.
    pub planned_weight_bytes: Option<u64>,
    /// Model file bytes this server sent to the node (counted here, not reported).
    pub downloaded_bytes: u64,
    /// Bytes of the assignment done, in all, and found in the node's own cache.
    pub download: [u64; 3],
    pub speed_gmacs: f64,
    /// Seconds the node's engine has spent on this epoch's steps, as it reports them.
    pub busy_s: f64,
    /// Steps, jobs and job-weighted busy seconds this epoch, as the node reports them.
    pub steps: u64,
    pub jobs: u64,
    pub job_busy_s: f64,
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
    /// Times the ring was planned again from measured busy times since members last changed.
    pub rebalances: u32,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SequencesView {
    pub in_flight: usize,
    pub queued: usize,
    pub peak_in_flight: usize,
    pub requests_active: usize,
    pub requests_waiting: usize,
    /// How requests fared when rings broke under them.
    pub recovery: RecoveryView,
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
                busy_from: None,
            },
        );
        r.rebalancing = false;
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
        r.rebalancing = false;
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
            ToServer::Stats(report) => {
                let ready_epoch = r.ring.as_ref().filter(|g| g.ready.len() == g.order.len());
                if let Some(g) = ready_epoch.filter(|g| g.epoch == report.epoch) {
                    if m.busy_from.is_none_or(|(e, _)| e != g.epoch) {
                        m.busy_from = Some((g.epoch, report.busy_s));
                    }
                }
                m.report = report;
            }
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
                    if let Some(j) = r.active.get_mut(&request) {
                        // No more than the request asked for, whatever the starter sends:
                        // what the room keeps per request stays bounded.
                        let left = j.req.max_tokens.saturating_sub(j.generated.len());
                        let tokens: Vec<u32> = tokens.into_iter().take(left).collect();
                        if !tokens.is_empty() {
                            j.generated.extend_from_slice(&tokens);
                            let _ = j.tx.send(StreamItem::Tokens(tokens));
                        }
                    }
                }
            }
            ToServer::Finished {
                request,
                finish,
                message,
            } => {
                if r.starter() == Some(id) {
                    if let Some(j) = r.active.remove(&request) {
                        let _ = j.tx.send(StreamItem::Finished(finish, message));
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
        r.pending.push_back(Job {
            id,
            req,
            generated: Vec::new(),
            tx,
            since: Instant::now(),
            resumes: 0,
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
        let sent = r.active.iter().find(|(_, j)| j.id == id).map(|(&d, _)| d);
        if let Some(d) = sent {
            r.active.remove(&d);
            if let Some(s) = r.starter() {
                r.send(s, ToNode::Cancel { request: d });
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
                .filter(|(_, m)| now.duration_since(m.last_seen) > m.heartbeat_timeout())
                .map(|(&id, _)| id)
                .collect();
            for id in silent {
                self.leave(&name, id, "no heartbeat", model);
            }
            let Some(r) = self.rooms.get_mut(&name) else {
                continue;
            };
            if cfg.rebalance {
                r.rebalance(&cfg, model);
            }
            if let Some(t) = r.changed {
                // Joins wait for the ring to be idle, so running requests are not paused;
                // under steady traffic, not forever: the requests resume on the new ring.
                let waited = now.duration_since(t);
                let idle = r.active.is_empty();
                if waited >= SETTLE && (idle || r.ring.is_none() || waited >= JOIN_WAIT) {
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
                sequences: SequencesView::default(),
                rebalances: 0,
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
                    wasm_memory_bytes: m.report.wasm_memory_bytes,
                    memory_budget: m.profile.memory_budget,
                    planned_weight_bytes: at.map(|(i, g)| g.plan.nodes[i].weight_bytes),
                    downloaded_bytes: served(id),
                    download: [m.progress.0, m.progress.1, m.progress.2],
                    speed_gmacs: m.profile.speed / 1e9,
                    busy_s: m.report.busy_s,
                    steps: m.report.steps,
                    jobs: m.report.jobs,
                    job_busy_s: m.report.job_busy_s,
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
                recovery: r.recovery,
            },
            rebalances: r.rebalances,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A room configuration for tests: rings of at least `min_nodes`, `in_flight` sequences.
    fn config(min_nodes: usize, in_flight: usize) -> RoomConfig {
        RoomConfig {
            min_nodes,
            in_flight,
            reserve_positions: 16,
            max_queued: 8,
            queue_timeout: Duration::from_secs(60),
            wire: mdi_core::wire::WireDtype::F16,
            rebalance: false,
        }
    }

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
        let cfg = config(2, 4);
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
        // A ring member leaving re-plans over who is left (min_nodes gated only the first
        // ring); the request waits, then resumes on the new starter with what it had
        // generated as part of its prompt, and its client sees only the new tokens.
        hub.leave("r", other, "test", &model);
        assert!(out.try_recv().is_err(), "the request waits");
        let v = hub.view("r", &model, &none);
        assert!(!v.ready);
        assert_eq!(v.sequences.requests_waiting, 1);
        assert_eq!(v.sequences.recovery.resumed, 1);
        let starter_rx = if starter == a { &mut a_rx } else { &mut b_rx };
        let mut assign = None;
        while let Ok(m) = starter_rx.try_recv() {
            if let ToNode::Assign(x) = m {
                assign = Some(x);
            }
        }
        let x = assign.expect("the one left gets the whole model");
        assert_eq!((x.n_nodes, x.index), (1, 0));
        hub.handle("r", starter, ToServer::Ready { epoch: x.epoch }, &model);
        let Ok(ToNode::Generate {
            request: again,
            prompt_tokens,
            max_tokens,
            ..
        }) = starter_rx.try_recv()
        else {
            panic!("the request resumes");
        };
        assert_ne!(again, request, "a resumed request is sent under a new id");
        assert_eq!((prompt_tokens, max_tokens), (vec![1, 2, 5], 2));
        // Late tokens of the old run are not the client's.
        hub.handle(
            "r",
            starter,
            ToServer::Tokens {
                request,
                tokens: vec![7],
            },
            &model,
        );
        // The starter cannot send more than was asked for.
        hub.handle(
            "r",
            starter,
            ToServer::Tokens {
                request: again,
                tokens: vec![6, 6, 6],
            },
            &model,
        );
        hub.handle(
            "r",
            starter,
            ToServer::Finished {
                request: again,
                finish: FinishReason::MaxTokens,
                message: None,
            },
            &model,
        );
        assert_eq!(out.try_recv(), Ok(StreamItem::Tokens(vec![6, 6])));
        assert_eq!(
            out.try_recv(),
            Ok(StreamItem::Finished(FinishReason::MaxTokens, None))
        );
        let v = hub.view("r", &model, &none);
        assert_eq!(v.sequences.recovery.replayed_tokens, 3);
        assert_eq!(v.sequences.requests_active, 0);
    }

    #[test]
    fn requests_wait_while_the_rest_cannot_hold_the_model_and_resume_when_memory_joins() {
        let (model, mut hub) = three_node_room();
        // 6 layers of 100 bytes and 256 of KV cache each, 50 for the starter's tensors: two
        // of these hold it, one does not.
        let budget = 1200;
        let mut rxs = HashMap::new();
        fn join(
            hub: &mut Hub,
            rxs: &mut HashMap<NodeId, mpsc::UnboundedReceiver<ToNode>>,
            name: &str,
            budget: u64,
        ) -> NodeId {
            let (tx, rx) = mpsc::unbounded_channel();
            let id = hub.join("r", name.into(), NodeKind::Native, profile(budget), tx);
            rxs.insert(id, rx);
            id
        }
        let ids: Vec<NodeId> = ["a", "b", "c"]
            .iter()
            .map(|n| join(&mut hub, &mut rxs, n, budget))
            .collect();
        hub.plan_now(&model);
        let ready = |hub: &mut Hub| {
            all_ready(hub, &model);
            assert!(hub.view("r", &model, &|_| 0).ready);
        };
        ready(&mut hub);
        let req = GenerateRequest {
            prompt_tokens: vec![1, 2, 3],
            max_tokens: 4,
            sampling: SamplingParams::default(),
            eos_ids: vec![0],
        };
        let (_, mut out) = hub.submit("r", req).unwrap();
        let starter = hub.rooms["r"].starter().unwrap();
        let sent = |rx: &mut mpsc::UnboundedReceiver<ToNode>| {
            let mut last = None;
            while let Ok(m) = rx.try_recv() {
                if let ToNode::Generate { request, .. } = m {
                    last = Some(request);
                }
            }
            last
        };
        let first = sent(rxs.get_mut(&starter).unwrap()).expect("sent to the starter");
        hub.handle(
            "r",
            starter,
            ToServer::Tokens {
                request: first,
                tokens: vec![8],
            },
            &model,
        );
        // The starter dies, then a second node: one node cannot hold the model.
        hub.leave("r", starter, "its connection closed", &model);
        let second = *ids.iter().find(|&&i| i != starter).unwrap();
        hub.leave("r", second, "no heartbeat", &model);
        let v = hub.view("r", &model, &|_| 0);
        assert!(!v.ready);
        assert!(v.status.contains("cannot hold the model"), "{}", v.status);
        assert_eq!(v.sequences.requests_waiting, 1);
        hub.tick(&model);
        assert_eq!(out.try_recv(), Ok(StreamItem::Tokens(vec![8])));
        assert!(out.try_recv().is_err(), "it waits, it is not failed");
        // Memory joins: the ring re-forms and the request resumes from its 8.
        let d = join(&mut hub, &mut rxs, "d", budget);
        hub.plan_now(&model);
        ready(&mut hub);
        let new_starter = hub.rooms["r"].starter().unwrap();
        assert!(new_starter == d || ids.contains(&new_starter));
        let rx = rxs.get_mut(&new_starter).unwrap();
        let mut resumed = None;
        while let Ok(m) = rx.try_recv() {
            if let ToNode::Generate {
                prompt_tokens,
                max_tokens,
                ..
            } = m
            {
                resumed = Some((prompt_tokens, max_tokens));
            }
        }
        assert_eq!(resumed, Some((vec![1, 2, 3, 8], 3)));
    }

    #[test]
    fn a_join_waits_for_an_idle_ring_but_not_forever_and_requests_give_up_after_many_breaks() {
        let (model, mut hub) = three_node_room();
        let mut rxs = Vec::new();
        let mut join = |hub: &mut Hub, name: &str| {
            let (tx, rx) = mpsc::unbounded_channel();
            rxs.push(rx);
            hub.join("r", name.into(), NodeKind::Native, profile(1 << 30), tx)
        };
        for n in ["a", "b", "c"] {
            join(&mut hub, n);
        }
        hub.plan_now(&model);
        let ready = |hub: &mut Hub| all_ready(hub, &model);
        ready(&mut hub);
        let req = GenerateRequest {
            prompt_tokens: vec![1],
            max_tokens: 4,
            sampling: SamplingParams::default(),
            eos_ids: vec![],
        };
        let (_, mut out) = hub.submit("r", req).unwrap();
        assert_eq!(hub.view("r", &model, &|_| 0).sequences.requests_active, 1);
        // A join while the request runs: no re-plan after the settle time...
        join(&mut hub, "d");
        let epoch = hub.rooms["r"].epoch;
        hub.rooms.get_mut("r").unwrap().changed = Some(Instant::now() - SETTLE);
        hub.tick(&model);
        assert_eq!(
            hub.rooms["r"].epoch, epoch,
            "the running request is not paused"
        );
        // ...but after JOIN_WAIT the ring re-forms with the new node and the request resumes.
        hub.rooms.get_mut("r").unwrap().changed = Some(Instant::now() - JOIN_WAIT);
        hub.tick(&model);
        assert!(hub.rooms["r"].epoch > epoch);
        assert_eq!(hub.rooms["r"].ring.as_ref().unwrap().order.len(), 4);
        assert_eq!(hub.view("r", &model, &|_| 0).sequences.recovery.resumed, 1);
        ready(&mut hub);
        assert_eq!(hub.view("r", &model, &|_| 0).sequences.requests_active, 1);
        // A request whose rings keep breaking gives up after MAX_RESUMES, with a reason.
        for _ in 0..MAX_RESUMES {
            assert!(out.try_recv().is_err());
            let starter = hub.rooms["r"].starter().unwrap();
            hub.handle(
                "r",
                starter,
                ToServer::Failed {
                    epoch: hub.rooms["r"].epoch,
                    message: "test".into(),
                },
                &model,
            );
            hub.rooms.get_mut("r").unwrap().retry_failed();
            hub.plan_now(&model);
            if hub.rooms["r"].ring.is_none() {
                let cfg = hub.config.clone();
                hub.rooms.get_mut("r").unwrap().replan(&cfg, &model);
            }
            ready(&mut hub);
        }
        let starter = hub.rooms["r"].starter().unwrap();
        hub.leave("r", starter, "test", &model);
        match out.try_recv() {
            Ok(StreamItem::Finished(FinishReason::Error, Some(m))) => {
                assert!(m.contains("giving up"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(hub.view("r", &model, &|_| 0).sequences.recovery.failed, 1);
    }

    #[test]
    fn a_request_that_waits_past_its_deadline_fails_with_the_reason() {
        let (model, mut hub) = three_node_room();
        hub.config.queue_timeout = Duration::from_millis(0);
        let (tx, _rx) = mpsc::unbounded_channel();
        hub.join("r", "a".into(), NodeKind::Native, profile(100), tx);
        hub.plan_now(&model);
        let (_, mut out) = hub
            .submit(
                "r",
                GenerateRequest {
                    prompt_tokens: vec![1],
                    max_tokens: 1,
                    sampling: SamplingParams::default(),
                    eos_ids: vec![],
                },
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        hub.tick(&model);
        match out.try_recv() {
            Ok(StreamItem::Finished(FinishReason::Error, Some(m))) => {
                assert!(
                    m.contains("no ready ring") && m.contains("waiting for nodes"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    /// Every member of room `r`'s planned ring says it is ready.
    fn all_ready(hub: &mut Hub, model: &ModelFacts) {
        let epoch = hub.rooms["r"].epoch;
        let order = hub.rooms["r"].ring.as_ref().unwrap().order.clone();
        for id in order {
            hub.handle("r", id, ToServer::Ready { epoch }, model);
        }
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
        (model, Hub::new(config(3, 2)))
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
        // The two left form the next ring.
        let v = hub.view("r", &model, &|_| 0);
        assert_eq!(v.nodes.len(), 2);
        assert!(v.epoch > epoch);
        assert!(v.status.starts_with("loading: 2 nodes"), "{}", v.status);
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

    /// Twelve layers, and an LM head worth two of them.
    fn twelve_layer_model() -> ModelFacts {
        ModelFacts {
            id: "tiny".into(),
            cost: ModelCost {
                layer_weight_bytes: vec![100; 12],
                kv_bytes_per_token: 8,
                layer_work: vec![1.0; 12],
                starter_weight_bytes: 50,
                starter_work: 2.0,
            },
            context: 64,
        }
    }

    /// The layers each node of room `r` was last assigned, by name.
    fn assignments(
        hub: &Hub,
        rxs: &mut [(String, mpsc::UnboundedReceiver<ToNode>)],
    ) -> Vec<(String, [usize; 2])> {
        let mut out = Vec::new();
        for (name, rx) in rxs.iter_mut() {
            let mut last = None;
            while let Ok(m) = rx.try_recv() {
                if let ToNode::Assign(a) = m {
                    last = Some(a.layers);
                }
            }
            if let Some(l) = last {
                out.push((name.clone(), l));
            }
        }
        assert!(hub.rooms["r"].ring.is_some());
        out
    }

    fn report(hub: &mut Hub, id: NodeId, model: &ModelFacts, busy_s: f64) {
        let epoch = hub.rooms["r"].epoch;
        let r = NodeReport {
            epoch,
            busy_s,
            ..NodeReport::default()
        };
        hub.handle("r", id, ToServer::Stats(r), model);
    }

    #[test]
    fn a_ring_is_planned_again_from_measured_busy_times_and_then_left_alone() {
        let model = twelve_layer_model();
        let mut hub = Hub::new(RoomConfig {
            rebalance: true,
            ..config(2, 2)
        });
        let mut rxs = Vec::new();
        let mut ids = Vec::new();
        for name in ["a", "b"] {
            let (tx, rx) = mpsc::unbounded_channel();
            ids.push(hub.join("r", name.into(), NodeKind::Native, profile(1 << 30), tx));
            rxs.push((name.to_string(), rx));
        }
        hub.rooms.get_mut("r").unwrap().changed = Some(Instant::now() - SETTLE);
        hub.tick(&model);
        // Equal self-benchmarks: 14 units of work split 7 / 7 (the starter's 2 are its head).
        let first = assignments(&hub, &mut rxs);
        assert_eq!(
            first,
            vec![("a".to_string(), [0, 5]), ("b".to_string(), [5, 12])]
        );
        all_ready(&mut hub, &model);
        assert!(hub.rooms["r"].is_ready());
        let epoch = hub.rooms["r"].epoch;

        // Too little busy time yet: nothing happens.
        report(&mut hub, ids[0], &model, 1.0);
        report(&mut hub, ids[1], &model, 1.0);
        report(&mut hub, ids[0], &model, 2.0);
        report(&mut hub, ids[1], &model, 3.0);
        hub.tick(&model);
        assert_eq!(hub.rooms["r"].epoch, epoch);

        // The starter is really twice as fast per unit of work as b: a's 7 units took 3.5 s,
        // b's 7 took 7 s. Planned again, b gets about a third of the work.
        report(&mut hub, ids[0], &model, 4.5);
        report(&mut hub, ids[1], &model, 8.0);
        hub.tick(&model);
        assert_eq!(
            hub.rooms["r"].epoch, epoch,
            "planned at the next tick, as a join"
        );
        hub.tick(&model);
        assert_eq!(hub.rooms["r"].epoch, epoch + 1, "planned again");
        let second = assignments(&hub, &mut rxs);
        assert_eq!(
            second,
            vec![("a".to_string(), [0, 7]), ("b".to_string(), [7, 12])]
        );
        assert_eq!(hub.view("r", &model, &|_| 0).rebalances, 1);

        // The new ring runs evenly: no gain in another plan, and none is made, even later.
        all_ready(&mut hub, &model);
        assert!(hub.rooms["r"].is_ready());
        report(&mut hub, ids[0], &model, 0.0);
        report(&mut hub, ids[1], &model, 0.0);
        report(&mut hub, ids[0], &model, 5.0);
        report(&mut hub, ids[1], &model, 5.2);
        hub.tick(&model);
        report(&mut hub, ids[0], &model, 50.0);
        report(&mut hub, ids[1], &model, 10.0);
        hub.tick(&model);
        assert_eq!(hub.rooms["r"].epoch, epoch + 1, "left alone");

        // A member joins: the measured speeds are forgotten and the self-benchmarks plan.
        let (tx, rx) = mpsc::unbounded_channel();
        hub.join("r", "c".into(), NodeKind::Native, profile(1 << 30), tx);
        rxs.push(("c".to_string(), rx));
        hub.rooms.get_mut("r").unwrap().changed = Some(Instant::now() - SETTLE);
        hub.tick(&model);
        assert_eq!(hub.rooms["r"].epoch, epoch + 2);
        assert_eq!(hub.view("r", &model, &|_| 0).rebalances, 0);
        assert!(hub.rooms["r"].measured.is_empty());
    }
}
