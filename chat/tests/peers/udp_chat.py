#!/usr/bin/env python3
"""The classic Python "multi-task UDP chat", as close to the original as a test allows.

One thread reads lines and sends each as a datagram; the other receives with a 1024-byte
buffer, decodes every datagram with strict UTF-8 and prints it. A datagram that is not valid
UTF-8 kills the receive thread with a traceback, as it does in the original. The only
changes: addresses come from the command line instead of input() prompts, and the bound port
is printed so a test can find it.

Usage: udp_chat.py BIND_IP DEST_IP DEST_PORT
"""

import socket
import sys
import threading


def recv_msg(udp_socket):
    while True:
        recv_data = udp_socket.recvfrom(1024)
        print("%s:%s" % (str(recv_data[1]), recv_data[0].decode("utf-8")), flush=True)


def send_msg(udp_socket, dest_ip, dest_port):
    for line in sys.stdin:
        udp_socket.sendto(line.rstrip("\n").encode("utf-8"), (dest_ip, dest_port))


def main():
    bind_ip, dest_ip, dest_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_socket.bind((bind_ip, int(sys.argv[4]) if len(sys.argv) > 4 else 0))
    print("ready %d" % udp_socket.getsockname()[1], flush=True)
    t_recv = threading.Thread(target=recv_msg, args=(udp_socket,))
    t_send = threading.Thread(target=send_msg, args=(udp_socket, dest_ip, dest_port))
    t_recv.start()
    t_send.start()


if __name__ == "__main__":
    main()
