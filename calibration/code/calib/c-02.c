/*
 * wordfreq.c - count word frequencies from stdin using an open-addressing
 * hash table, then print the most frequent words.
 *
 * Build: cc -O2 -Wall -o wordfreq wordfreq.c
 * Usage: wordfreq [top_n] < file.txt
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *word;
    unsigned long count;
} entry_t;

static entry_t *table;
static size_t capacity = 1024;
static size_t used;

/* FNV-1a, 64-bit */
static unsigned long long hash_str(const char *s)
{
    unsigned long long h = 1469598103934665603ULL;
    while (*s) {
        h ^= (unsigned char)*s++;
        h *= 1099511628211ULL;
    }
    return h;
}

static void insert(const char *word, unsigned long add);

static void grow(void)
{
    entry_t *old = table;
    size_t old_cap = capacity;

    capacity *= 2;
    table = calloc(capacity, sizeof *table);
    if (!table) {
        perror("calloc");
        exit(1);
    }
    used = 0;
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i].word) {
            insert(old[i].word, old[i].count);
            free(old[i].word);
        }
    }
    free(old);
}

static void insert(const char *word, unsigned long add)
{
    if ((used + 1) * 4 > capacity * 3)   /* keep load factor under 0.75 */
        grow();
    size_t i = hash_str(word) & (capacity - 1);
    while (table[i].word && strcmp(table[i].word, word) != 0)
        i = (i + 1) & (capacity - 1);    /* linear probing */
    if (!table[i].word) {
        table[i].word = strdup(word);
        used++;
    }
    table[i].count += add;
}

static int by_count_desc(const void *a, const void *b)
{
    const entry_t *x = a, *y = b;
    if (x->count != y->count)
        return x->count < y->count ? 1 : -1;
    return strcmp(x->word, y->word);
}

int main(int argc, char **argv)
{
    int top = argc > 1 ? atoi(argv[1]) : 10;
    char word[128];
    size_t len = 0;
    int c;

    table = calloc(capacity, sizeof *table);
    if (!table)
        return 1;

    while ((c = getchar()) != EOF) {
        if (isalpha(c) || (c == '\'' && len > 0)) {
            if (len < sizeof word - 1)
                word[len++] = (char)tolower(c);
        } else if (len > 0) {
            word[len] = '\0';
            insert(word, 1);
            len = 0;
        }
    }
    if (len > 0) {
        word[len] = '\0';
        insert(word, 1);
    }

    /* compact the table so qsort only sees real entries */
    size_t n = 0;
    for (size_t i = 0; i < capacity; i++)
        if (table[i].word)
            table[n++] = table[i];
    qsort(table, n, sizeof *table, by_count_desc);

    for (size_t i = 0; i < n && (int)i < top; i++)
        printf("%7lu  %s\n", table[i].count, table[i].word);

    for (size_t i = 0; i < n; i++)
        free(table[i].word);
    free(table);
    return 0;
}
