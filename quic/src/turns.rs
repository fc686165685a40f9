//! Taking turns in the order streams were opened: each task waits for the
//! one before it and lets the next one go when it is done, however it
//! ends. The relay writes a connection's stored deliveries this way (in
//! acceptance order), and a client passes clips on this way
//! (`ClientOptions::in_order`).

use tokio::sync::oneshot;

/// Hands out turns, in order.
#[derive(Debug, Default)]
pub struct Turns {
    /// Fires once the latest turn handed out is done.
    last: Option<oneshot::Receiver<()>>,
}

impl Turns {
    /// The next turn: it comes after every turn handed out before.
    pub fn next_turn(&mut self) -> Turn {
        let (done, after) = oneshot::channel();
        Turn {
            prev: self.last.replace(after),
            done: Some(done),
        }
    }
}

/// One task's turn. `Turn::default()` waits for nothing and lets nothing
/// wait (out of any order).
#[derive(Debug, Default)]
pub struct Turn {
    prev: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// Waits until every earlier turn is done.
    pub async fn wait(&mut self) {
        if let Some(p) = self.prev.take() {
            // A turn dropped without being done still counts as done.
            let _ = p.await;
        }
    }
}

impl Drop for Turn {
    /// Done: the next turn may go. A turn dropped before it waited (its
    /// task ended early) still lets the next one go only after its own
    /// predecessor is done, so the order holds for the rest.
    fn drop(&mut self) {
        let Some(done) = self.done.take() else { return };
        match (self.prev.take(), tokio::runtime::Handle::try_current()) {
            (Some(prev), Ok(rt)) => {
                rt.spawn(async move {
                    let _ = prev.await;
                    let _ = done.send(());
                });
            }
            _ => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_go_in_order_even_when_one_ends_without_waiting() {
        let mut turns = Turns::default();
        let (mut a, b, mut c) = (turns.next_turn(), turns.next_turn(), turns.next_turn());
        a.wait().await;
        let waiting = tokio::spawn(async move {
            c.wait().await;
        });
        // b ends without waiting: c must still wait for a.
        drop(b);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "c went before a was done");
        drop(a);
        waiting.await.unwrap();
    }

    #[tokio::test]
    async fn a_default_turn_waits_for_nothing() {
        let mut t = Turn::default();
        t.wait().await;
    }
}
