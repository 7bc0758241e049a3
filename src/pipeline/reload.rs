//! Reloading the models while running: a thread of its own looks for changes (the topology
//! file and every model's file or version directory, every `reload.poll_interval`, where
//! `reload.watch` is on) and takes requests (`POST /admin/models/reload`, see
//! `telemetry::admin`). A reload reads the topology file again; only its `[[model]]`,
//! `[[alert]]` and `[reload]` sections may differ from what the processor started with. It
//! builds a new [`ModelSet`] beside the one scoring (each new model opened, checked against
//! its entry and warmed up with a row that must score finite numbers) and hands it over; the
//! loop switches to it between two cycles ([`Reloader::take`]), and only then are `/models`
//! and the requests that asked for it answered. Anything wrong refuses the whole reload, with
//! the reason logged and counted: the models before keep scoring.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use super::models::{ModelSet, Refused};
use crate::batcher::Scored;
use crate::telemetry::admin::{self, ModelRow, Reply, Request};
use crate::telemetry::events::{ReloadRefused, ReloadUnchanged};
use crate::topology::{self, Loaded};

/// The topology sections a reload may change.
const RELOADABLE: [&str; 3] = ["model", "alert", "reload"];

/// A set built and not yet switched to.
type Built = Arc<Mutex<Option<Handover>>>;

/// Where a reload request's answer goes.
type ReplyTo = tokio::sync::oneshot::Sender<Reply>;

/// A set for the loop to switch to, and the reload requests waiting for that switch.
pub(super) struct Handover {
    pub(super) set: Arc<ModelSet>,
    /// Each request's reply, and whether it changed anything (`switched`, not `unchanged`).
    waiting: Vec<(ReplyTo, bool)>,
}

impl Handover {
    /// The loop has switched to the set: `/models` shows it (`rows`), and the requests are
    /// answered with it.
    pub(super) fn switched(self, rows: Vec<ModelRow>) {
        admin::publish_models(rows.clone());
        for (reply, changed) in self.waiting {
            let _ = reply.send(if changed {
                Reply::Switched(rows.clone())
            } else {
                Reply::Unchanged(rows.clone())
            });
        }
    }
}

/// The reloading thread, and the set it built that the loop has yet to switch to.
pub(super) struct Reloader {
    built: Built,
    requests: Sender<Request>,
    thread: Option<JoinHandle<()>>,
}

impl Reloader {
    /// Starts the thread, with `models` as the set scoring now (new models get `throttle`, the
    /// testing aid), and registers it for the admin endpoint.
    pub(super) fn start(
        loaded: &Loaded,
        models: &Arc<ModelSet>,
        results: Sender<Scored>,
        throttle: Option<f64>,
    ) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(&loaded.file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", loaded.file.display()))?;
        let started =
            fixed_sections(&text).map_err(|e| anyhow::anyhow!("{}: {e}", loaded.file.display()))?;
        let built = Built::default();
        let (requests, incoming) = channel();
        admin::publish_models(rows(models, loaded));
        admin::serve_reloads(requests.clone());
        let mut watcher = Watcher {
            file: loaded.file.clone(),
            started,
            loaded: loaded.clone(),
            current: models.clone(),
            results,
            throttle,
            built: built.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("model-reload".into())
            .spawn(move || watcher.run(&incoming))
            .map_err(|e| anyhow::anyhow!("starting the model reload thread: {e}"))?;
        Ok(Reloader {
            built,
            requests,
            thread: Some(thread),
        })
    }

    /// A set built since the last call, to score the next cycle with; once switched to, the
    /// loop calls [`Handover::switched`].
    pub(super) fn take(&self) -> Option<Handover> {
        self.built.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        admin::stop_reloads();
        let _ = self.requests.send(Request::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread's state: the topology as last loaded, and the set built from it.
struct Watcher {
    file: PathBuf,
    /// The sections a reload must not change, as the processor started with them.
    started: toml::Table,
    loaded: Loaded,
    current: Arc<ModelSet>,
    results: Sender<Scored>,
    throttle: Option<f64>,
    built: Built,
}

/// What a look at the files saw: per file, its length and modification time.
type Seen = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

impl Watcher {
    fn run(&mut self, incoming: &Receiver<Request>) {
        let mut seen = self.look();
        let mut changed: Option<Seen> = None;
        loop {
            match incoming.recv_timeout(self.loaded.topology.reload.poll_interval) {
                Ok(Request::Reload(reply)) => {
                    self.reload(Some(reply));
                    seen = self.look();
                    changed = None;
                }
                Ok(Request::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) if self.loaded.topology.reload.watch => {
                    let now = self.look();
                    if now == seen {
                        changed = None;
                    } else if changed.as_ref() == Some(&now) {
                        // Changed, and the same for one more look: a copy has finished.
                        self.reload(None);
                        seen = self.look();
                        changed = None;
                    } else {
                        changed = Some(now);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// The topology file, and each model's file or version directories.
    fn look(&self) -> Seen {
        let stat = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?))
        };
        let mut seen = vec![(self.file.clone(), stat(&self.file))];
        let base = self.file.parent().unwrap_or(Path::new("."));
        for m in &self.loaded.topology.models {
            let path = base.join(&m.path);
            if path.is_dir() {
                let mut versions: Vec<PathBuf> = std::fs::read_dir(&path)
                    .map(|d| {
                        d.filter_map(|e| Some(e.ok()?.path().join("model.onnx")))
                            .collect()
                    })
                    .unwrap_or_default();
                versions.sort();
                seen.push((path, None));
                seen.extend(versions.into_iter().map(|v| {
                    let s = stat(&v);
                    (v, s)
                }));
            } else {
                let s = stat(&path);
                seen.push((path, s));
            }
        }
        seen
    }

    /// Reads the topology again and builds its models, handing the set over unless nothing
    /// changed. A request is answered once the loop has switched (or at once, when refused or
    /// when nothing changed and no set waits for the loop).
    fn reload(&mut self, reply: Option<ReplyTo>) {
        match self.build() {
            Ok(None) => {
                ReloadUnchanged.emit();
                let mut slot = self.built.lock().unwrap_or_else(|p| p.into_inner());
                match (slot.as_mut(), reply) {
                    (Some(pending), Some(reply)) => pending.waiting.push((reply, false)),
                    (None, Some(reply)) => {
                        let _ = reply.send(Reply::Unchanged(rows(&self.current, &self.loaded)));
                    }
                    (_, None) => {}
                }
            }
            Ok(Some(set)) => {
                let mut slot = self.built.lock().unwrap_or_else(|p| p.into_inner());
                let mut waiting = Vec::new();
                if let Some(untaken) = slot.take() {
                    // A newer set replaces one the loop has not taken yet (it never scored):
                    // whoever asked for that one is answered when this one is switched to.
                    untaken.set.retire_unless_in(&set);
                    waiting = untaken.waiting;
                }
                waiting.extend(reply.map(|r| (r, true)));
                *slot = Some(Handover {
                    set: set.clone(),
                    waiting,
                });
                drop(slot);
                self.current = set;
            }
            Err(Refused(reason)) => {
                ReloadRefused { reason: &reason }.emit();
                if let Some(reply) = reply {
                    let _ = reply.send(Reply::Refused(reason));
                }
            }
        }
    }

    fn build(&mut self) -> Result<Option<Arc<ModelSet>>, Refused> {
        let file = self.file.display().to_string();
        let text =
            std::fs::read_to_string(&self.file).map_err(|e| Refused(format!("{file}: {e}")))?;
        let fixed = fixed_sections(&text).map_err(|e| Refused(format!("{file}: {e}")))?;
        if let Some(key) = self
            .started
            .keys()
            .chain(fixed.keys())
            .find(|k| self.started.get(*k) != fixed.get(*k))
        {
            return Err(Refused(format!(
                "{file}: `{key}` differs from what the processor started with; a reload changes \
                 only [[model]], [[alert]] and [reload] (restart to change the rest)"
            )));
        }
        // The text checked above, not the file read again (it may have changed meanwhile).
        let loaded =
            topology::load_text(&self.file, &text, true).map_err(|e| Refused(e.to_string()))?;
        let (set, fresh) =
            ModelSet::build(&loaded, Some(&self.current), &self.results, self.throttle)
                .map_err(|Refused(r)| Refused(format!("{file}: {r}")))?;
        let same = fresh == 0
            && loaded.topology.models == self.loaded.topology.models
            && loaded.topology.alerts == self.loaded.topology.alerts;
        self.loaded = loaded;
        Ok((!same).then(|| Arc::new(set)))
    }
}

/// The topology's sections a reload must leave as they are.
fn fixed_sections(text: &str) -> Result<toml::Table, String> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    for k in RELOADABLE {
        table.remove(k);
    }
    Ok(table)
}

/// What `GET /models` and `kscore models` show of a set.
pub(super) fn rows(set: &ModelSet, loaded: &Loaded) -> Vec<ModelRow> {
    let base = loaded.file.parent().unwrap_or(Path::new("."));
    set.members
        .iter()
        .zip(&set.shares)
        .map(|(m, share)| ModelRow {
            name: m.entry.name.clone(),
            answers_as: m.published_as.clone(),
            version: m.version().to_string(),
            role: m.entry.role.as_str().into(),
            of: m.entry.of.clone(),
            share: *share,
            path: base.join(&m.entry.path).display().to_string(),
            file: m.file.display().to_string(),
            loaded_at: humantime::format_rfc3339_millis(m.loaded_at).to_string(),
        })
        .collect()
}
