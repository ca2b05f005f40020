/*
 * Serial console, printf and the few libc functions the compiler may call.
 * Used at CPL3 normally and at CPL0 only from the exception reporter.
 */
#include "guest.h"

/* ---- libc ---- */

/*
 * Built with -fno-tree-loop-distribute-patterns, so gcc does not turn these
 * loops back into calls to themselves.
 */
void *memset(void *d, int c, size_t n)
{
        u8 *p = d;
        while (n--)
                *p++ = (u8)c;
        return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
        u8 *p = d;
        const u8 *q = s;
        while (n--)
                *p++ = *q++;
        return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
        const u8 *p = a, *q = b;
        for (; n; n--, p++, q++)
                if (*p != *q)
                        return *p - *q;
        return 0;
}

size_t strlen(const char *s)
{
        size_t n = 0;
        while (s[n])
                n++;
        return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
        for (; n; n--, a++, b++) {
                if (*a != *b)
                        return (u8)*a - (u8)*b;
                if (!*a)
                        return 0;
        }
        return 0;
}

int strcmp(const char *a, const char *b)
{
        return strncmp(a, b, (size_t)-1);
}

/* ---- formatting ---- */

struct out {
        char *buf;
        size_t size, len;
};

static void emit(struct out *o, char c)
{
        if (o->len + 1 < o->size)
                o->buf[o->len] = c;
        o->len++;
}

/* Supports %d %i %u %x %X %p %s %c %%, flags '-' '0', width, l/ll/z. */
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
        struct out o = { buf, size, 0 };
        char tmp[24];

        for (; *fmt; fmt++) {
                if (*fmt != '%') {
                        emit(&o, *fmt);
                        continue;
                }
                fmt++;
                int left = 0, zero = 0, width = 0, lng = 0;
                for (;; fmt++) {
                        if (*fmt == '-')
                                left = 1;
                        else if (*fmt == '0')
                                zero = 1;
                        else
                                break;
                }
                while (*fmt >= '0' && *fmt <= '9')
                        width = width * 10 + (*fmt++ - '0');
                while (*fmt == 'l' || *fmt == 'z') {
                        lng++;
                        fmt++;
                }

                const char *s = tmp;
                int n = 0, neg = 0;
                u64 v;
                unsigned base = 10;
                switch (*fmt) {
                case 'c':
                        tmp[0] = (char)va_arg(ap, int);
                        n = 1;
                        break;
                case 's':
                        s = va_arg(ap, const char *);
                        if (!s)
                                s = "(null)";
                        n = (int)strlen(s);
                        break;
                case 'd':
                case 'i': {
                        i64 sv = lng ? va_arg(ap, i64) : va_arg(ap, int);
                        neg = sv < 0;
                        v = neg ? -(u64)sv : (u64)sv;
                        goto number;
                }
                case 'p':
                        lng = 1;
                        emit(&o, '0');
                        emit(&o, 'x');
                        /* fall through */
                case 'x':
                case 'X':
                        base = 16;
                        /* fall through */
                case 'u':
                        v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
                number: {
                        const char *digits = *fmt == 'X' ? "0123456789ABCDEF"
                                                         : "0123456789abcdef";
                        char *e = tmp + sizeof(tmp);
                        char *p = e;
                        do {
                                *--p = digits[v % base];
                                v /= base;
                        } while (v);
                        if (neg) {
                                if (zero)
                                        emit(&o, '-'), width--;
                                else
                                        *--p = '-';
                        }
                        s = p;
                        n = (int)(e - p);
                        break;
                }
                case '%':
                        tmp[0] = '%';
                        n = 1;
                        break;
                default:
                        tmp[0] = '?';
                        n = 1;
                        if (!*fmt)
                                fmt--;
                        break;
                }
                if (!left)
                        for (; width > n; width--)
                                emit(&o, zero ? '0' : ' ');
                for (int i = 0; i < n; i++)
                        emit(&o, s[i]);
                for (; width > n; width--)
                        emit(&o, ' ');
        }
        if (o.size)
                o.buf[o.len < o.size ? o.len : o.size - 1] = 0;
        return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(buf, size, fmt, ap);
        va_end(ap);
        return n;
}

/* ---- serial output ---- */

/*
 * One lock for the whole console so lines from different CPUs never
 * interleave.  Plain `lock xchg` works at CPL3.  THR is written without
 * polling LSR: the VMM's UART (and QEMU's) is always ready.
 */
static volatile u32 console_lock;

static void lock_console(void)
{
        while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
                while (console_lock)
                        cpu_relax();
}

static void unlock_console(void)
{
        __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

/* For the CPL0 exception reporter: do not deadlock on a holder that died. */
void console_force_lock(void)
{
        for (int i = 0; i < 1000000; i++) {
                if (!__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
                        return;
                cpu_relax();
        }
}

void console_write(const char *s, size_t n)
{
        for (size_t i = 0; i < n; i++)
                outb(PORT_COM1, (u8)s[i]);
}

void putc(char c)
{
        lock_console();
        outb(PORT_COM1, (u8)c);
        unlock_console();
}

void puts(const char *s)
{
        lock_console();
        console_write(s, strlen(s));
        outb(PORT_COM1, '\n');
        unlock_console();
}

int printf(const char *fmt, ...)
{
        char buf[512];
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        lock_console();
        console_write(buf, n < (int)sizeof(buf) ? (size_t)n : sizeof(buf) - 1);
        unlock_console();
        return n;
}
