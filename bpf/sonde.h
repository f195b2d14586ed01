/* Shared definitions for Sonde's probes.
 *
 * Probes never include kernel headers for struct layouts and never dereference
 * kernel pointers: the headers bcc compiles against need not match the running
 * kernel, and a wrong offset gives silent garbage. Constants come from stable
 * UAPI values, spelled out here.
 */
#ifndef SONDE_H
#define SONDE_H

#define SONDE_AF_INET 2
#define SONDE_AF_INET6 10
#define SONDE_IPPROTO_TCP 6
#define SONDE_MSG_PEEK 2
#define SONDE_EEXIST 17

#ifndef MAX_ENTRIES
#define MAX_ENTRIES 10240
#endif

#define SONDE_COMM_LEN 16

#endif
