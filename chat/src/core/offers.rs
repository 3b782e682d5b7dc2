//! File offers through the core: to a chat peer as a control message in its ordered stream
//! (sealed with a key, like any message), to an IP Messenger user as SENDMSG with
//! FILEATTACHOPT; the answers (decline, withdraw) the same ways. What is offered and how the
//! bytes travel is `crate::transfer`'s.

use std::net::SocketAddr;
use std::time::Instant;

use super::events::{Event, Protocol};
use super::{canonical, Core, SendError, Sent};
use crate::transfer::offer::{Control, OfferedFile};
use crate::wire;

impl Core {
    /// Offers `files` to `to` with a message: the packet number the offer goes by, which
    /// requests for its files name.
    pub fn send_offer(
        &mut self,
        now: Instant,
        to: SocketAddr,
        text: &str,
        files: &[OfferedFile],
    ) -> Result<(Sent, u64), SendError> {
        let to = canonical(to);
        if self.is_ipmsg(to) {
            // SENDMSG with FILEATTACHOPT, whose packet number its requests name.
            return self.ipmsg_send_with(now, to, text, Some(files));
        }
        let Some(instance) = self.peers.run_at(to) else {
            return Err(SendError::NoFiles(to));
        };
        self.next_offer += 1;
        let packet = self.next_offer;
        let control = Control::Offer {
            packet,
            text: text.to_string(),
            files: files.to_vec(),
        }
        .encode();
        if control.len() > wire::MAX_TEXT {
            return Err(SendError::TooLong(control.len()));
        }
        let shown = format!("an offer of {} file(s)", files.len());
        let sent = self.send_reliable(now, instance, &control, &shown)?;
        Ok((sent, packet))
    }

    /// Tells `to` we will not take its offer `packet`.
    pub fn decline_offer(
        &mut self,
        now: Instant,
        to: SocketAddr,
        packet: u64,
    ) -> Result<(), SendError> {
        self.offer_answer(now, to, Control::Decline(packet))
    }

    /// Tells `to` we no longer serve our offer `packet` (IP Messenger has no word for this:
    /// its users just find the files gone).
    pub fn withdraw_offer(
        &mut self,
        now: Instant,
        to: SocketAddr,
        packet: u64,
    ) -> Result<(), SendError> {
        // IP Messenger has no withdrawal: `offer_answer` sends it only a decline.
        self.offer_answer(now, to, Control::Withdraw(packet))
    }

    fn offer_answer(
        &mut self,
        now: Instant,
        to: SocketAddr,
        control: Control,
    ) -> Result<(), SendError> {
        let to = canonical(to);
        if self.is_ipmsg(to) {
            if let Control::Decline(packet) = control {
                self.ipmsg_release(now, to, packet);
            }
            return Ok(());
        }
        let instance = self.peers.run_at(to).ok_or(SendError::NoFiles(to))?;
        self.send_reliable(now, instance, &control.encode(), "an answer to an offer")?;
        Ok(())
    }
}

/// A complete message from a chat peer: text, or a control message about files; true when
/// it was a malformed control message (shown as a notice, and counted).
pub(super) fn chat_message(from: SocketAddr, nick: String, message: Vec<u8>) -> (Event, bool) {
    let event = match Control::parse(&message) {
        None => Event::Message {
            from,
            nick: Some(nick),
            text: String::from_utf8_lossy(&message).into_owned(),
            protocol: Protocol::Chat,
        },
        Some(Ok(Control::Offer {
            packet,
            text,
            files,
        })) => Event::FileOffer {
            from,
            nick: Some(nick),
            protocol: Protocol::Chat,
            packet,
            text,
            files,
        },
        Some(Ok(Control::Decline(packet))) => Event::OfferDeclined {
            from,
            packet,
            via: super::Via::Chat,
        },
        Some(Ok(Control::Withdraw(packet))) => Event::OfferWithdrawn { from, packet },
        Some(Err(why)) => {
            let notice = format!("ignored a malformed file offer from {from}: {why}");
            return (Event::Notice(notice), true);
        }
    };
    (event, false)
}
