/*
 * ringbuf.c - a byte ring buffer for a UART receive path.
 *
 * The buffer size must be a power of two so that indices can be wrapped
 * with a mask instead of a modulo.  head is written only by the producer
 * (interrupt handler), tail only by the consumer (main loop).
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define RB_SIZE 64u
#define RB_MASK (RB_SIZE - 1u)

typedef struct {
    uint8_t data[RB_SIZE];
    volatile uint32_t head; /* next slot to write */
    volatile uint32_t tail; /* next slot to read  */
    uint32_t dropped;       /* bytes lost because the buffer was full */
} ringbuf_t;

static void rb_init(ringbuf_t *rb)
{
    memset(rb, 0, sizeof *rb);
}

static uint32_t rb_count(const ringbuf_t *rb)
{
    /* unsigned subtraction wraps correctly even after overflow */
    return rb->head - rb->tail;
}

static int rb_put(ringbuf_t *rb, uint8_t byte)
{
    if (rb_count(rb) == RB_SIZE) {
        rb->dropped++;
        return -1;
    }
    rb->data[rb->head & RB_MASK] = byte;
    rb->head++;
    return 0;
}

static int rb_get(ringbuf_t *rb, uint8_t *out)
{
    if (rb->head == rb->tail)
        return -1;
    *out = rb->data[rb->tail & RB_MASK];
    rb->tail++;
    return 0;
}

/* Copy one '\n'-terminated line into buf; returns its length or -1. */
static int rb_read_line(ringbuf_t *rb, char *buf, size_t cap)
{
    uint32_t n = rb_count(rb);
    uint32_t i;

    for (i = 0; i < n; i++) {
        if (rb->data[(rb->tail + i) & RB_MASK] == '\n')
            break;
    }
    if (i == n || i + 1 > cap)
        return -1;              /* no full line yet, or it won't fit */

    for (uint32_t k = 0; k < i; k++)
        rb_get(rb, (uint8_t *)&buf[k]);
    buf[i] = '\0';
    uint8_t newline;
    rb_get(rb, &newline);       /* discard the terminator */
    return (int)i;
}

int main(void)
{
    ringbuf_t rb;
    char line[32];
    const char *incoming = "AT+OK\nTEMP=21.5\npartial";

    rb_init(&rb);
    for (const char *p = incoming; *p; p++)
        rb_put(&rb, (uint8_t)*p);

    while (rb_read_line(&rb, line, sizeof line) >= 0)
        printf("line: %s\n", line);

    printf("left in buffer: %u bytes, dropped: %u\n",
           (unsigned)rb_count(&rb), (unsigned)rb.dropped);
    return 0;
}
