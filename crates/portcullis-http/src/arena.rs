//! Blocks that short-lived byte strings are written into one after another: each string is
//! split off sharing its block, so it costs no allocation of its own, and a block whose strings
//! are all gone is filled again rather than freed. A fresh block would cost its thread page
//! faults and zeroed pages once the allocator has given the old one back to the system.
//!
//! Strings are expected to go roughly in the order they were written (sent, logged, dropped):
//! the oldest block is the first one that can be filled again.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

#[derive(Debug)]
pub struct Arena {
    /// Bytes a block holds (more for a string that does not fit in one).
    block: usize,
    /// Free blocks kept for reuse, at least; beyond them, and beyond as many as are in use, free
    /// blocks are let go. (Under a steady load of strings held a while, such as messages held
    /// until their batch is sent, about as many blocks are freed at once as are in use: those
    /// are the next ones filled, not given back to the allocator and asked for again, with
    /// page faults and zeroed pages.)
    kept: usize,
    /// What is left of the block being filled.
    current: BytesMut,
    /// The blocks filled before it, oldest first.
    filled: VecDeque<BytesMut>,
    /// Blocks asked of the allocator so far.
    made: u64,
}

impl Arena {
    pub fn new(block: usize, kept: usize) -> Arena {
        Arena { block, kept, current: BytesMut::new(), filled: VecDeque::new(), made: 0 }
    }

    /// The block being filled, with at least `room` bytes free: write a string at its end and
    /// split it off.
    pub fn room(&mut self, room: usize) -> &mut BytesMut {
        if self.current.capacity() - self.current.len() < room {
            let size = self.block.max(room);
            // The oldest block again when it is unique (none of its strings is held any more).
            let reuse = self.filled.front_mut().is_some_and(|oldest| oldest.try_reclaim(size));
            let next = if reuse { self.filled.pop_front() } else { None };
            let next = next.unwrap_or_else(|| {
                self.made += 1;
                BytesMut::with_capacity(size)
            });
            let full = std::mem::replace(&mut self.current, next);
            if full.capacity() > 0 {
                self.filled.push_back(full);
            }
            self.trim();
        }
        &mut self.current
    }

    /// A copy of `bytes` in the arena.
    pub fn copy(&mut self, bytes: &[u8]) -> Bytes {
        let current = self.room(bytes.len());
        current.extend_from_slice(bytes);
        current.split().freeze()
    }

    /// The block being filled, taken out with at least `room` bytes free (to write into where
    /// the arena cannot be borrowed); give back what is left with [`Arena::put_back`].
    pub fn take(&mut self, room: usize) -> BytesMut {
        std::mem::take(self.room(room))
    }

    pub fn put_back(&mut self, rest: BytesMut) {
        self.current = rest;
    }

    /// Lets free blocks go beyond the few kept for reuse (after a burst, or while strings were
    /// held long, many may be free).
    pub fn trim(&mut self) {
        // The free blocks are the oldest ones (strings go roughly in order). A filled block has
        // less than a block's bytes left: it reclaims that much only when unique. (One with more,
        // a block grown for a long string, is let go as if it were: the strings in it keep their
        // memory until they go.)
        let mut free = 0;
        for b in &mut self.filled {
            if !b.try_reclaim(self.block) {
                break;
            }
            free += 1;
        }
        let in_use = self.filled.len() + 1 - free;
        for _ in self.kept.max(in_use)..free {
            self.filled.pop_front();
        }
    }

    /// Blocks filled before the current one, still kept.
    pub fn filled(&self) -> usize {
        self.filled.len()
    }

    /// Blocks asked of the allocator so far.
    pub fn made(&self) -> u64 {
        self.made
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_block_is_filled_again_once_its_strings_are_gone() {
        let mut arena = Arena::new(64 * 1024, 8);
        // Big enough for one per block: each string starts a block.
        let text = vec![b'x'; 40 * 1024];
        let first = arena.copy(&text);
        assert_eq!(first, text);
        assert_ne!(first.as_ptr(), text.as_ptr(), "a copy");
        let first_block = first.as_ptr();
        let second = arena.copy(&text);
        // The first block is held by `first`: the third string goes to a fresh block.
        let third = arena.copy(&text);
        assert!(![first_block, second.as_ptr()].contains(&third.as_ptr()));
        // Once the first block's string is gone, the next block needed is that one.
        drop(first);
        let fourth = arena.copy(&text);
        assert_eq!(fourth.as_ptr(), first_block, "the first block filled again");
        assert_eq!(fourth, text);
        // After a burst: many blocks, all free once their strings go; a few are kept.
        drop((second, third, fourth));
        let many: Vec<Bytes> = (0..20).map(|_| arena.copy(&text)).collect();
        assert!(arena.filled() >= 19, "{}", arena.filled());
        drop(many);
        arena.trim();
        assert_eq!(arena.filled(), 8);
    }

    #[test]
    fn blocks_in_use_do_not_push_out_the_free_ones() {
        // A steady load: twelve blocks' strings held at every moment, the older half let go at
        // once (a batch sent), the arena trimmed, and as many written again. The blocks freed
        // are the ones filled again: no block is asked for anew, though more are free at once
        // than the two kept at least.
        let mut arena = Arena::new(1024, 2);
        let text = vec![b'x'; 1000];
        let mut held: VecDeque<Bytes> = (0..12).map(|_| arena.copy(&text)).collect();
        assert_eq!(arena.made(), 12);
        for round in 0..10 {
            held.drain(..6);
            arena.trim();
            held.extend((0..6).map(|_| arena.copy(&text)));
            assert_eq!(arena.made(), 12, "round {round}: the blocks freed are filled again");
        }
        // Once none is in use, two are kept.
        held.clear();
        arena.trim();
        assert_eq!(arena.filled(), 2);
    }

    #[test]
    fn a_string_longer_than_a_block_gets_a_block_of_its_own() {
        let mut arena = Arena::new(1024, 2);
        let short = arena.copy(b"abc");
        let long = arena.copy(&[7; 5000]);
        assert_eq!((&short[..], long.len()), (&b"abc"[..], 5000));
        // Taken out and given back: what was written stays the caller's.
        let mut taken = arena.take(10);
        taken.extend_from_slice(b"record");
        let record = taken.split().freeze();
        arena.put_back(taken);
        assert_eq!(arena.copy(b"next"), &b"next"[..]);
        assert_eq!(record, &b"record"[..]);
    }
}
