'use strict';
/**
 * EventEmitter-style pub/sub with wildcard topics.
 *
 * Topics are dot-separated ("order.created").  A subscriber may use "*"
 * for exactly one segment or "#" at the end for any remaining segments.
 */
class Bus {
  constructor() {
    this.subs = [];
    this.nextId = 1;
  }

  static compile(pattern) {
    const parts = pattern.split('.');
    return (topic) => {
      const t = topic.split('.');
      for (let i = 0; i < parts.length; i++) {
        if (parts[i] === '#') return true;
        if (i >= t.length) return false;
        if (parts[i] !== '*' && parts[i] !== t[i]) return false;
      }
      return t.length === parts.length;
    };
  }

  subscribe(pattern, handler, { once = false } = {}) {
    const id = this.nextId++;
    this.subs.push({ id, pattern, test: Bus.compile(pattern), handler, once });
    return () => this.unsubscribe(id);
  }

  unsubscribe(id) {
    this.subs = this.subs.filter((s) => s.id !== id);
  }

  publish(topic, payload) {
    let delivered = 0;
    for (const sub of [...this.subs]) {
      if (!sub.test(topic)) continue;
      if (sub.once) this.unsubscribe(sub.id);
      try {
        sub.handler(payload, topic);
        delivered++;
      } catch (err) {
        console.error(`handler for "${sub.pattern}" failed:`, err.message);
      }
    }
    return delivered;
  }
}

const bus = new Bus();
bus.subscribe('order.*', (p, t) => console.log('order event', t, p.id));
bus.subscribe('order.#', (p, t) => console.log('audit', t));
bus.subscribe('user.login', () => console.log('first login seen'), { once: true });

bus.publish('order.created', { id: 17 });
bus.publish('order.item.added', { id: 17 });
bus.publish('user.login', {});
console.log('second login delivered to', bus.publish('user.login', {}), 'handlers');

module.exports = { Bus };
