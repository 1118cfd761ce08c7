//! The worker slots of one server as plain state: how many workers it should run, which slots exist, what each
//! one runs and which are stopping. No tasks and no locks: the supervisor keeps it under a mutex and acts on what
//! its methods return (the events to publish).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::event::Event;
use crate::job::{Job, Micros};
use crate::store::WorkerRecord;

/// What a busy slot runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    pub job_id: Arc<str>,
    pub command: Arc<str>,
    pub started_at: Micros,
}

impl Running {
    pub fn of(job: &Job, started_at: Micros) -> Running {
        Running {
            job_id: job.id.as_str().into(),
            command: job.command.as_str().into(),
            started_at,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    running: Option<Running>,
    stopping: bool,
}

#[derive(Debug, Default)]
pub struct Slots {
    target: u32,
    slots: BTreeMap<u32, Slot>,
    /// Set once the server drains: no slot takes new work.
    draining: bool,
    /// Set while this server may not hold claims (it lost its lease on a shared database): no slot takes work.
    suspended: bool,
    /// Set while the queue is paused: no slot takes work; running jobs go on.
    paused: bool,
}

impl Slots {
    /// Sets how many workers run. New slots start idle; the extra ones stop, at once if idle, else when their job
    /// ends. Returns the events to publish.
    pub fn set_target(&mut self, target: u32) -> Vec<Event> {
        let mut events = Vec::new();
        self.target = target;
        for index in 0..target {
            let slot = self.slots.entry(index).or_insert_with(|| {
                events.push(Event::WorkerStarted { worker: index });
                Slot::default()
            });
            slot.stopping = false;
        }
        let surplus: Vec<u32> = self
            .slots
            .range(target..)
            .map(|(index, _)| *index)
            .collect();
        for index in surplus {
            let slot = self.slots.get_mut(&index).expect("listed above");
            if !slot.stopping {
                slot.stopping = true;
                events.push(Event::WorkerStopping { worker: index });
            }
            if slot.running.is_none() {
                self.slots.remove(&index);
                events.push(Event::WorkerExited { worker: index });
            }
        }
        events
    }

    pub fn target(&self) -> u32 {
        self.target
    }

    /// From now on no slot takes new work; running jobs go on.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    pub fn draining(&self) -> bool {
        self.draining
    }

    /// While `suspended`, no slot takes work, as in a drain, but the slots stay ready to go on afterwards.
    pub fn suspend(&mut self, suspended: bool) {
        self.suspended = suspended;
    }

    /// While `paused`, no slot takes work; running jobs finish.
    pub fn pause(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Whether slots may take work at all now.
    fn taking_work(&self) -> bool {
        !self.draining && !self.suspended && !self.paused
    }

    /// The slots that could take a job now.
    pub fn idle(&self) -> Vec<u32> {
        if !self.taking_work() {
            return Vec::new();
        }
        self.slots
            .iter()
            .filter(|(_, slot)| slot.running.is_none() && !slot.stopping)
            .map(|(index, _)| *index)
            .collect()
    }

    /// Marks idle `worker` busy; false if it is no longer idle (stopped or taken since it was found idle).
    pub fn occupy(&mut self, worker: u32, running: Running) -> bool {
        if !self.taking_work() {
            return false;
        }
        match self
            .slots
            .get_mut(&worker)
            .filter(|slot| slot.running.is_none() && !slot.stopping)
        {
            Some(slot) => {
                slot.running = Some(running);
                true
            }
            None => false,
        }
    }

    /// Whether busy `worker` may take another job when its current one ends: not when it is stopping or the
    /// server drains.
    pub fn keeps_working(&self, worker: u32) -> bool {
        self.taking_work()
            && worker < self.target
            && self.slots.get(&worker).is_some_and(|slot| !slot.stopping)
    }

    /// Moves busy `worker` on to its next job; false if it must stop instead.
    pub fn move_on(&mut self, worker: u32, running: Running) -> bool {
        if !self.keeps_working(worker) {
            return false;
        }
        match self.slots.get_mut(&worker) {
            Some(slot) => {
                slot.running = Some(running);
                true
            }
            None => false,
        }
    }

    /// Frees `worker` once its job ended. A slot that was stopping goes away: returns its exit event.
    pub fn release(&mut self, worker: u32) -> Option<Event> {
        let slot = self.slots.get_mut(&worker)?;
        slot.running = None;
        if slot.stopping || worker >= self.target {
            self.slots.remove(&worker);
            return Some(Event::WorkerExited { worker });
        }
        None
    }

    /// Every slot, as `status` shows it.
    pub fn records(&self) -> Vec<WorkerRecord> {
        self.slots
            .iter()
            .map(|(index, slot)| WorkerRecord {
                index: *index,
                job_id: slot.running.as_ref().map(|run| run.job_id.to_string()),
                command: slot.running.as_ref().map(|run| run.command.to_string()),
                started_at: slot.running.as_ref().map(|run| run.started_at),
                stopping: slot.stopping,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(id: &str) -> Running {
        Running {
            job_id: id.into(),
            command: "true".into(),
            started_at: 0,
        }
    }

    #[test]
    fn new_slots_start_idle_and_announce_themselves() {
        let mut slots = Slots::default();
        assert_eq!(
            slots.set_target(2),
            vec![
                Event::WorkerStarted { worker: 0 },
                Event::WorkerStarted { worker: 1 }
            ]
        );
        assert_eq!(slots.idle(), vec![0, 1]);
        assert!(slots.set_target(2).is_empty(), "nothing changed");
    }

    #[test]
    fn a_busy_slot_is_not_idle_and_cannot_be_taken_twice() {
        let mut slots = Slots::default();
        slots.set_target(2);
        assert!(slots.occupy(0, running("a")));
        assert!(!slots.occupy(0, running("b")));
        assert_eq!(slots.idle(), vec![1]);
        assert_eq!(slots.records()[0].job_id.as_deref(), Some("a"));
        assert_eq!(slots.release(0), None);
        assert_eq!(slots.idle(), vec![0, 1]);
    }

    #[test]
    fn shrinking_stops_idle_slots_at_once_and_busy_ones_when_their_job_ends() {
        let mut slots = Slots::default();
        slots.set_target(3);
        assert!(slots.occupy(2, running("long")));
        assert_eq!(
            slots.set_target(1),
            vec![
                Event::WorkerStopping { worker: 1 },
                Event::WorkerExited { worker: 1 },
                Event::WorkerStopping { worker: 2 },
            ]
        );
        assert!(!slots.keeps_working(2), "a stopping slot takes no next job");
        assert!(!slots.move_on(2, running("next")));
        assert!(slots.records()[1].stopping);
        assert_eq!(slots.release(2), Some(Event::WorkerExited { worker: 2 }));
        assert_eq!(slots.records().len(), 1);
        assert_eq!(slots.idle(), vec![0]);
    }

    #[test]
    fn growing_again_keeps_a_stopping_slot_that_still_runs() {
        let mut slots = Slots::default();
        slots.set_target(2);
        assert!(slots.occupy(1, running("a")));
        slots.set_target(1);
        assert_eq!(slots.set_target(2), Vec::new(), "slot 1 still exists");
        assert!(slots.keeps_working(1));
        assert!(slots.move_on(1, running("b")));
        assert_eq!(slots.records()[1].job_id.as_deref(), Some("b"));
    }

    #[test]
    fn a_suspended_server_starts_nothing_until_it_resumes() {
        let mut slots = Slots::default();
        slots.set_target(2);
        assert!(slots.occupy(0, running("a")));
        slots.suspend(true);
        assert!(slots.idle().is_empty());
        assert!(!slots.occupy(1, running("b")));
        assert!(!slots.keeps_working(0));
        slots.suspend(false);
        assert_eq!(slots.idle(), vec![1]);
        assert!(slots.keeps_working(0));
    }

    #[test]
    fn a_draining_server_starts_nothing_new() {
        let mut slots = Slots::default();
        slots.set_target(2);
        assert!(slots.occupy(0, running("a")));
        slots.drain();
        assert!(slots.idle().is_empty());
        assert!(!slots.occupy(1, running("b")));
        assert!(!slots.keeps_working(0));
        assert_eq!(slots.release(0), None, "the slot stays, idle, for status");
    }

    #[test]
    fn a_paused_queue_lets_running_jobs_finish_but_starts_none() {
        let mut slots = Slots::default();
        slots.set_target(2);
        assert!(slots.occupy(0, running("job1")));
        slots.pause(true);
        assert!(slots.idle().is_empty());
        assert!(!slots.occupy(1, running("job2")));
        assert!(!slots.keeps_working(0), "its job ends, then it waits");
        assert_eq!(slots.records()[0].job_id.as_deref(), Some("job1"));
        slots.release(0);
        slots.pause(false);
        assert_eq!(slots.idle(), vec![0, 1]);
    }
}
