/*
 * strutil.c - small string helpers that avoid the usual strtok/strcpy traps.
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

/* Trim leading and trailing whitespace in place; returns s. */
char *str_trim(char *s)
{
    char *start = s;
    while (isspace((unsigned char)*start))
        start++;
    char *end = start + strlen(start);
    while (end > start && isspace((unsigned char)end[-1]))
        end--;
    *end = '\0';
    if (start != s)
        memmove(s, start, (size_t)(end - start) + 1);
    return s;
}

/* Copy at most size-1 bytes and always terminate; returns strlen(src). */
size_t str_copy(char *dst, const char *src, size_t size)
{
    size_t len = strlen(src);
    if (size > 0) {
        size_t n = len < size - 1 ? len : size - 1;
        memcpy(dst, src, n);
        dst[n] = '\0';
    }
    return len;
}

/*
 * Split s on sep into at most max fields.  Fields point into s, which is
 * modified.  Empty fields are kept, unlike strtok.
 */
int str_split(char *s, char sep, char **fields, int max)
{
    int n = 0;
    if (max <= 0)
        return 0;
    fields[n++] = s;
    for (char *p = s; *p && n < max; p++) {
        if (*p == sep) {
            *p = '\0';
            fields[n++] = p + 1;
        }
    }
    return n;
}

int str_starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

int main(void)
{
    char line[] = "   name,,age,city \n";
    char *fields[8];
    char small[6];

    str_trim(line);
    printf("trimmed: [%s]\n", line);

    int n = str_split(line, ',', fields, 8);
    for (int i = 0; i < n; i++)
        printf("field %d: [%s]\n", i, fields[i]);

    size_t want = str_copy(small, "truncate me", sizeof small);
    printf("copied [%s], needed %zu bytes\n", small, want + 1);
    printf("starts with 'na': %d\n", str_starts_with("name", "na"));
    return 0;
}
