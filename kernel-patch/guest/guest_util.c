// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * guest_util: tiny helpers for the UML guest's init script.
 *   guest_util lo-up      bring the loopback interface up (no iproute2 needed)
 *   guest_util poweroff   sync and power the (UML) machine off
 */
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc == 2 && !strcmp(argv[1], "lo-up")) {
		struct ifreq ifr = { 0 };
		int fd = socket(AF_INET, SOCK_DGRAM, 0);

		strcpy(ifr.ifr_name, "lo");
		if (fd < 0 || ioctl(fd, SIOCGIFFLAGS, &ifr)) {
			perror("lo-up: SIOCGIFFLAGS");
			return 1;
		}
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(fd, SIOCSIFFLAGS, &ifr)) {
			perror("lo-up: SIOCSIFFLAGS");
			return 1;
		}
		return 0;
	}
	if (argc == 2 && !strcmp(argv[1], "poweroff")) {
		sync();
		reboot(RB_POWER_OFF);
		perror("poweroff");
		return 1;
	}
	fprintf(stderr, "usage: %s lo-up|poweroff\n", argv[0]);
	return 2;
}
